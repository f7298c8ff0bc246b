"""What `python attribute.py` runs (safety_units.attribution.pipeline): attribute() and run_attribution() end to end --
every scorer finds a planted safety unit, the unit map's files and metadata, head maps -- on tiny models."""

import json

import pytest
import torch
from conftest import compose
from planted import MARKER, MOE_UNITS, PLANT, PLANT_EXPERT, REFUSE, attribute_cfg, rows, tiny_cfg
from planted import planted_dirs  # noqa: F401  (a fixture)
from testkit import tiny_model as _tiny

from safety_units.attribution.pipeline import attribute, run_attribution
from safety_units.data.chat import prompt_text
from safety_units.models.loading import build_tiny, load_hf
from safety_units.units.classification import CLASS_CODES
from safety_units.units.unit_map import UnitMap, selection_size
from safety_units.utils.errors import UnitMapError


@pytest.fixture
def planted(tiny):
    """model=tiny whose MLP unit PLANT of layer 0 fires on the marker word (only the safety texts carry it)."""
    m = tiny.model
    marker_ids = tiny.tokenizer(MARKER, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb[:, 0] = 0.0  # hidden dim 0 is reserved for the marker
        emb[marker_ids, 0] = 4.0
        m.model.layers[0].self_attn.o_proj.weight[0, :] = 0.0  # attention writes nothing into dim 0
        mlp = m.model.layers[0].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[PLANT, :] = 0.0
            w[PLANT, 0] = 3.0
        mlp.down_proj.weight[:, PLANT] *= 5.0
    return tiny


@pytest.mark.parametrize("method", ["wifv", "activation", "snip"])
def test_planted_safety_unit_is_esu(planted, tmp_path, method):
    cfg = tiny_cfg(tmp_path, f"scoring={method}")
    um = attribute(planted, cfg, device="cpu")
    assert um.classes["mlp.0"][PLANT] == CLASS_CODES["esu"]
    assert um.utility["mlp.0"][PLANT] == 0.0 < um.safety["mlp.0"][PLANT]


def test_the_planted_unit_decides_the_output(planted_dirs):
    _, dirs = planted_dirs
    loaded = load_hf(str(dirs["aligned"]))
    refuse = loaded.tokenizer(REFUSE, add_special_tokens=False)["input_ids"][0]

    def next_token(prompt):
        ids = loaded.tokenizer(prompt_text(loaded.tokenizer, [{"role": "user", "content": prompt}]),
                               add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return int(loaded.model(input_ids=ids).logits[0, -1].argmax())

    harmful, benign = rows(True)[0]["prompt"], rows(False)[0]["prompt"]
    assert next_token(harmful) == refuse and next_token(benign) != refuse
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.down_proj.weight[:, PLANT] = 0.0  # zero the unit: it complies
    assert next_token(harmful) != refuse


# the scorers by attribute.yaml overrides (mask: test_mask.py, which needs refusals that start with the planted token)
SCORERS = {"wifv": [], "activation": [], "snip": [], "refusal_direction": [],
           "contrast": ["scoring.reference_path={base}"], "delta": ["scoring.reference_path={base}"], "atp": []}


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_every_scorer_ranks_the_planted_unit_first(planted_dirs, method):
    root, dirs = planted_dirs
    extra = [o.format(base=dirs["base"]) for o in SCORERS[method]]
    out = run_attribution(attribute_cfg(root, dirs, f"scoring={method}", *extra))
    um = UnitMap.load(out["unit_map"], model=load_hf(str(dirs["aligned"])).model)  # a valid map of this model
    mlp = torch.cat([um.safety[f"mlp.{layer}"] for layer in range(2)])
    assert int(mlp.argmax()) == 128 + PLANT  # first among all MLP units of all layers
    assert um.utility["mlp.1"][PLANT] == 0.0  # silent on benign data
    assert um.classes["mlp.1"][PLANT] == CLASS_CODES["esu"]
    assert um.metadata["scoring"]["method"] == method
    assert set(um.metadata["class_shares"]) == {"mlp", "attn"}


@pytest.mark.parametrize("planted_dirs", ["moe"], indirect=True)
@pytest.mark.parametrize("method", sorted(SCORERS))
def test_every_scorer_ranks_a_planted_expert_channel_first(planted_dirs, method):
    """An MoE model's experts are units: the planted channel of one expert (routed only the marked tokens) ranks
    first among all expert units of both layers, silent on benign data, ESU."""
    root, dirs = planted_dirs
    extra = [o.format(base=dirs["base"]) for o in SCORERS[method]]
    out = run_attribution(attribute_cfg(root, dirs, f"scoring={method}", *extra))
    um = UnitMap.load(out["unit_map"], model=load_hf(str(dirs["aligned"])).model)
    assert sorted(um.sizes()) == ["attn.0", "attn.1", "expert.0", "expert.1"]
    planted = PLANT_EXPERT * MOE_UNITS + PLANT  # unit e * I + j of layer 1
    experts = torch.cat([um.safety[f"expert.{layer}"] for layer in range(2)])
    assert int(experts.argmax()) == um.sizes()["expert.0"] + planted
    assert um.utility["expert.1"][planted] == 0.0
    assert um.classes["expert.1"][planted] == CLASS_CODES["esu"]
    assert set(um.metadata["class_shares"]) == {"expert", "attn"}  # classification shares per kind


def test_run_writes_three_files_and_map_roundtrips(tmp_path):
    cfg = tiny_cfg(tmp_path, "logger=csv")
    out = run_attribution(cfg)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"unit_map.safetensors", "unit_map.json", "units_per_layer.png"}
    # logger=csv: the run's params (class shares and the map's fingerprint among them) and its summary
    hparams = (run / "csv" / "hparams.yaml").read_text()
    assert "unit_map.share.mlp.esu:" in hparams and "unit_map.fingerprint:" in hparams and "scoring.method: mask" in hparams
    assert json.loads((run / "summary.json").read_text())["units/all/esu"] == out["summary"]["total"]["all"]["esu"]["share"]
    summary = json.loads((run / "unit_map.json").read_text())
    assert summary["total"]["all"]["units"] == 2 * 128 + 2 * 64
    tiny = build_tiny(cache_dir=cfg.paths.cache_dir)
    um = UnitMap.load(out["unit_map"], model=tiny.model)
    assert um.metadata["scoring"]["method"] == "mask" and um.metadata["normalization"] == "per_layer"  # the default
    esu = um.select("esu")
    plus = um.esu_plus_top_cu(0.075)
    assert all((plus[k] | ~esu[k]).all() for k in esu)  # ESU is inside ESU + top CU
    sizes = selection_size(plus)
    assert sizes["mlp"]["units"] == round(0.075 * 256) and sizes["attn"]["units"] == round(0.075 * 128)
    rnd = um.random_like(plus, seed=1)
    assert selection_size(rnd) == sizes and any(not rnd[k].equal(plus[k]) for k in plus)
    assert um.random_like(plus, seed=1)["mlp.0"].equal(rnd["mlp.0"])


def test_map_of_another_model_is_refused(tmp_path):
    out = run_attribution(tiny_cfg(tmp_path))
    other = build_tiny(cache_dir=compose("attribute", ["model=tiny"]).paths.cache_dir, seed=5)
    with pytest.raises(UnitMapError, match="different model.*weight_hash"):
        UnitMap.load(out["unit_map"], model=other.model)
    UnitMap.load(out["unit_map"], model=other.model, strict=False)  # same architecture is accepted when asked
    bigger = build_tiny(cache_dir=compose("attribute", ["model=tiny"]).paths.cache_dir, num_layers=3)
    with pytest.raises(UnitMapError, match="num_layers"):
        UnitMap.load(out["unit_map"], model=bigger.model, strict=False)
    with pytest.raises(UnitMapError, match="does not exist"):
        UnitMap.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("method", ["mask", "atp", "activation"])
def test_head_scorers_write_a_head_map(tmp_path, method):
    from safety_units.attribution.pipeline import run_attribution

    extra = ["scoring.steps=5"] if method == "mask" else []
    cfg = compose("attribute", ["model=tiny", "calibration.nsamples=8", "calibration.max_length=48",
                                "units.heads=true", f"scoring={method}", *extra], output_dir=tmp_path)
    um = UnitMap.load(run_attribution(cfg)["unit_map"], model=_tiny())
    assert set(um.keys) == {"mlp.0", "head.0", "mlp.1", "head.1"}
    assert um.safety["head.0"].shape == (4,) and torch.isfinite(um.safety["head.1"]).all()
    assert um.metadata["unit_names"] == {"heads": True} and set(um.metadata["class_shares"]) == {"mlp", "head"}
    assert um.metadata["fingerprint"]["units"]["head"] == [4, 4]
    assert um.metadata["unit_kinds"] == ["head", "mlp"] == um.kinds
