"""The peers' published settings (experiments/defense_bench/peers.py): every override composes with our train config
and sets the value it names, every deviation is complete, and every peer defense of conf/defense has both tables."""

import pytest
from conftest import ROOT
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from safety_units.experiments.defense_bench.peers import (DEVIATIONS, NOW_FAITHFUL, PEER_DEFENSES,
                                                          PEERS_AS_PUBLISHED, align_overrides, finetune_overrides)
from safety_units.utils.config import compose_config

CONF_DEFENSES = {p.stem for p in (ROOT / "conf" / "defense").glob("*.yaml")}
KEYS = {"source", "stage", "align_adapter", "align", "sft_align", "adapter", "finetune", "task", "defense"}


def runs() -> dict[tuple, list[str]]:
    """Every distinct run of the tables: (data, defense, overrides) -> the peers that share it."""
    out: dict[tuple, list[str]] = {}
    for d, p in PEERS_AS_PUBLISHED.items():
        stage = p["stage"]
        for run in (("mix", d if stage == "align" else "none", tuple(align_overrides(d))),
                    ("mix", "none", (*p["align_adapter"], *p["sft_align"])),
                    ("task_mix", d if stage in ("finetune", "post") else "none",
                     (*finetune_overrides(d), *p["task"]))):
            out.setdefault(run, []).append(d)
    return out


RUNS = runs()


@pytest.mark.parametrize("run", list(RUNS), ids=[f"{'+'.join(v)}:{k[0]}:{k[1]}" for k, v in RUNS.items()])
def test_every_override_composes_and_sets_its_value(run):
    data, defense, overrides = run
    cfg = compose_config("train", ["~experiment", f"data={data}", f"defense={defense}", *overrides])
    assert cfg.defense.name == defense
    parser = OverridesParser.create()
    for text in overrides:
        o = parser.parse_override(text)
        key, value = o.key_or_group, o.value()
        if "." not in key:  # a group: adapter=lora
            assert key == "adapter" and value == "lora" and cfg.adapter._target_.endswith("LoraAdapter"), text
            continue
        got = OmegaConf.select(cfg, key, throw_on_missing=True)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, f"{text}: the composed config has {key}={got!r}"


@pytest.mark.parametrize("defense", list(PEERS_AS_PUBLISHED))
def test_every_entry_has_the_schema_and_its_defense_stage(defense):
    p = PEERS_AS_PUBLISHED[defense]
    assert set(p) == KEYS and p["source"]
    cfg = compose_config("train", ["~experiment", f"defense={defense}"])
    assert cfg.defense.stage == p["stage"]
    assert all(o.startswith("defense.") for o in p["defense"])
    assert all(o.startswith(("adapter", "optim.", "trainer.", "data.")) for key in KEYS - {"source", "stage",
               "defense"} for o in p[key]), "the settings name our config groups"
    assert p["adapter"][0] == p["align_adapter"][0] == "adapter=lora"  # the peers align and fine-tune through LoRA


def test_every_peer_defense_has_both_tables_and_complete_deviations():
    assert set(PEER_DEFENSES) <= CONF_DEFENSES
    assert set(PEERS_AS_PUBLISHED) <= CONF_DEFENSES and "none" in PEERS_AS_PUBLISHED
    for d in CONF_DEFENSES & set(PEER_DEFENSES):
        assert d in PEERS_AS_PUBLISHED and DEVIATIONS.get(d), d
    assert set(PEERS_AS_PUBLISHED) - {"none"} <= set(DEVIATIONS) and "sn_tune" in DEVIATIONS
    assert set(NOW_FAITHFUL) <= set(DEVIATIONS)
    for d, rows in DEVIATIONS.items():
        for row in rows:
            assert set(row) == {"what", "official", "ours", "why"}, (d, row)
            assert all(isinstance(v, str) and v.strip() for v in row.values()), (d, row)
        whats = [row["what"] for row in rows]
        assert len(whats) == len(set(whats)), f"{d}: a deviation listed twice"
