"""freeze= strategies (safety_units.training.freezing): frozen entries stay bit-identical, trainable entries move."""
import json
from pathlib import Path

import pytest
import torch
from conftest import compose, train_cfg
from testkit import EXACT, loaded_weights as _loaded_weights, tiny_mixtral, unit_deltas as _unit_deltas
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from safety_units.attribution.pipeline import run_attribution

from safety_units.utils.errors import ConfigError, UnitMapError
from safety_units.training.freezing import build_masker
from safety_units.units.masking import Masker, masks_from_selection
from safety_units.models.loading import build_tiny
from safety_units.training.fit import run_train
from safety_units.units.unit_map import UnitMap, load_selection, random_units
from safety_units.units.groups import resolve_units


def _max(t):
    return float(t.max()) if t.numel() else 0.0


def _frozen_and_trainable_deltas(masker, exported, loaded):
    """max |delta| over frozen entries and over trainable entries, from the exported files (not the log)."""
    frozen = trainable = 0.0
    for name, ref in loaded.items():
        cur = exported[name] if name in exported else exported["model.embed_tokens.weight"]  # tied lm_head
        delta = (cur - ref).abs()
        if name in masker.frozen_full:
            frozen = max(frozen, float(delta.max()))
        elif name in masker.partial:
            m = masker.partial[name]
            frozen = max(frozen, _max(delta.index_select(m.dim, m.frozen_index())))
            trainable = max(trainable, _max(delta.index_select(m.dim, m.trainable_index())))
        else:
            trainable = max(trainable, float(delta.max()))
    return frozen, trainable


@pytest.mark.parametrize("strategy,extra", [
    ("esu", []), ("esu_cu", []), ("ru_only", []), ("random", ["freeze.like=esu_cu", "freeze.seed=3"]),
    ("random", ["freeze.like=ru_only"]), ("layers", ["freeze.layers=[1]"]),
    ("esu_cu", ["freeze.mechanism=forward"]), ("esu_cu", ["trainer.precision=bf16-mixed"]),
    ("train_only", ["freeze.classes=[esu,euu]"]),
], ids=["esu", "esu_cu", "ru_only", "random_like_esu_cu", "random_like_ru_only", "layers", "esu_cu_forward_masks",
        "esu_cu_bf16_mixed", "train_only_esu_euu"])
def test_frozen_entries_bit_identical(unit_map, tmp_path, strategy, extra):
    cfg = train_cfg(tmp_path, *EXACT, f"freeze={strategy}", f"freeze.unit_map={unit_map}", *extra)
    summary = run_train(cfg)
    loaded = _loaded_weights()
    exported = load_file(tmp_path / "model" / "model.safetensors")
    masker, _ = build_masker(cfg, build_tiny(cache_dir=cfg.paths.cache_dir).model)
    frozen, trainable = _frozen_and_trainable_deltas(masker, exported, loaded)
    assert frozen == 0.0
    assert trainable > 1e-4
    assert summary["frozen_max_abs_delta"] == 0.0 and summary["trainable_changed"]
    entries = summary["freeze"]["entries"]
    assert 0 < entries["frozen"] < entries["total"]
    if strategy == "ru_only":
        assert entries["trainable_share"] < 0.2  # only RU rows/columns train
    if strategy != "layers":
        assert (tmp_path / "model" / "unit_map.safetensors").is_file()  # the map travels with the model
        role = "trained" if strategy in ("ru_only", "train_only") or "freeze.like=ru_only" in extra else "frozen"
        exported_set, meta = load_selection(tmp_path / "model" / f"{role}_units.safetensors")
        assert all(exported_set[k].equal(masker.selection[k]) for k in masker.selection) and meta["role"] == role
    if strategy == "train_only":  # exactly ESU + EUU train
        want = UnitMap.load(unit_map).select(["esu", "euu"])
        assert all(exported_set[k].equal(want[k]) for k in want)
        assert entries["trainable_share"] < 0.1


def test_ddp_spawn_two_processes_keeps_exactness_and_one_rank_writes(unit_map, tmp_path, capfd):
    """Two gloo processes: frozen entries exact, and rank zero alone writes the run's files and tables (before /
    after evaluation, export, frozen check, params and summary, the loggers'); rank one writes nothing under the
    run dir, and there is one wandb run."""
    run, spy = tmp_path / "run", tmp_path / "spy"
    cfg = train_cfg(run, *EXACT, "trainer=ddp_spawn", "freeze=esu_cu", f"freeze.unit_map={unit_map}",
                    "trainer.max_steps=3", "logger=many", "callbacks=eval", "callbacks.eval.suite.limit=2",
                    "callbacks.eval.suite.max_new_tokens=4", "~callbacks.model_checkpoint",
                    "+callbacks.spy._target_=spies.WriteSpy", f"+callbacks.spy.watch={run}",
                    f"+callbacks.spy.out={spy}")
    run_train(cfg)
    exported = load_file(run / "model" / "model.safetensors")
    masker, _ = build_masker(cfg, build_tiny(cache_dir=cfg.paths.cache_dir).model)
    frozen, trainable = _frozen_and_trainable_deltas(masker, exported, _loaded_weights())
    assert frozen == 0.0 and trainable > 1e-4
    ranks = {r["rank"]: r for r in (json.loads(p.read_text()) for p in spy.glob("rank*.json"))}
    assert sorted(ranks) == [0, 1] and ranks[0]["world_size"] == 2
    assert ranks[1]["written"] == []
    assert {"eval_compare.md", "eval_before.json", "eval_after.json", "model/config.json", "params.json",
            "summary.json", "model/freeze_check.json", "model/safety_units_config.yaml"} <= set(ranks[0]["written"])
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # one wandb run, rank zero's
    assert json.loads((run / "summary.json").read_text())["freeze/frozen_max_abs_delta"] == 0.0
    assert capfd.readouterr().out.count("before / after training:") == 1


def test_resume_with_masks_equals_uninterrupted(unit_map, tmp_path):
    common = [*EXACT, "trainer.max_steps=6", "freeze=esu_cu", f"freeze.unit_map={unit_map}", "callbacks=default",
              "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.model_checkpoint.save_top_k=-1"]
    run_train(train_cfg(tmp_path / "a", *common))
    run_train(train_cfg(tmp_path / "b", *common, f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'step000003.ckpt'}"))
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_strategy_errors(unit_map, tmp_path):
    tiny = build_tiny(cache_dir=compose("train", ["model=tiny"]).paths.cache_dir)
    with pytest.raises(ConfigError, match="needs a unit map"):
        build_masker(train_cfg(tmp_path, "freeze=esu"), tiny.model)
    with pytest.raises(ConfigError, match=r"total_share must be in \(0, 1\)"):
        build_masker(train_cfg(tmp_path, "freeze=esu_cu", f"freeze.unit_map={unit_map}", "freeze.total_share=1.5"),
                     tiny.model)
    with pytest.raises(ConfigError, match="freeze.layers"):
        build_masker(train_cfg(tmp_path, "freeze=layers", "freeze.layers=[]"), tiny.model)
    other = build_tiny(cache_dir=compose("train", ["model=tiny"]).paths.cache_dir, seed=9)
    with pytest.raises(UnitMapError, match="different model"):
        build_masker(train_cfg(tmp_path, "freeze=esu", f"freeze.unit_map={unit_map}"), other.model)
    nothing = {k: torch.zeros_like(v) for k, v in UnitMap.load(unit_map).select("ru").items()}
    partial, full = masks_from_selection(tiny.model, nothing, "train_only")
    with pytest.raises(ConfigError, match="nothing trainable"):
        Masker(tiny.model, partial, full)


def test_auto_attribution_is_cached(tmp_path):
    overrides = ["freeze=esu", "freeze.auto_attribute=true", "freeze.attribute_overrides=['calibration.nsamples=8']"]
    cache = tmp_path / "cache"
    cfg = train_cfg(tmp_path, *overrides, f"paths.cache_dir={cache}", "trainer.max_steps=1")
    tiny = build_tiny(cache_dir=compose("train", ["model=tiny"]).paths.cache_dir)
    path1 = build_masker(cfg, tiny.model, tiny.tokenizer)[1].path
    assert str(path1).startswith(str(cache / "unit_maps"))
    mtime = Path(path1).stat().st_mtime_ns
    path2 = build_masker(cfg, tiny.model, tiny.tokenizer)[1].path
    assert path2 == path1 and Path(path2).stat().st_mtime_ns == mtime


def test_periodic_frozen_check_is_logged(unit_map, tmp_path):
    import csv

    run_train(train_cfg(tmp_path, *EXACT, "freeze=esu", f"freeze.unit_map={unit_map}", "freeze.check_every_n_steps=2"))
    rows = [r for r in csv.DictReader(open(tmp_path / "csv" / "metrics.csv")) if r.get("freeze/frozen_max_abs_delta")]
    assert len(rows) >= 1 and all(float(r["freeze/frozen_max_abs_delta"]) == 0.0 for r in rows)


def test_train_only_random_share_moves_only_the_planted_units(tmp_path):
    cfg = train_cfg(tmp_path, *EXACT, "freeze=train_only", "freeze.random_share=0.05", "freeze.seed=3")
    summary = run_train(cfg)
    loaded, exported = _loaded_weights(), load_file(tmp_path / "model" / "model.safetensors")
    planted, meta = load_selection(tmp_path / "model" / "trained_units.safetensors")
    assert meta["role"] == "trained" and meta["random_share"] == 0.05 and meta["seed"] == 3
    # the documented share per kind (round(0.05 * units)), drawn by the seed
    assert {kind: sum(int(v.sum()) for k, v in planted.items() if k.startswith(kind)) for kind in ("mlp", "attn")} \
        == {"mlp": round(0.05 * 256), "attn": round(0.05 * 128)}
    sizes = {k: v.numel() for k, v in planted.items()}
    assert all(planted[k].equal(v) for k, v in random_units(sizes, {"mlp": 13, "attn": 6}, seed=3).items())
    assert any(not planted[k].equal(v) for k, v in random_units(sizes, {"mlp": 13, "attn": 6}, seed=4).items())
    # every entry outside S is bit-identical -- embeddings, norms, q/k/v, lm_head included; every unit of S moved
    model = build_tiny(cache_dir=cfg.paths.cache_dir).model
    unit_params = {sl.name for g in resolve_units(model) for sl in g.slices}
    for name, ref in loaded.items():
        if name not in unit_params:
            assert torch.equal(exported.get(name, exported["model.embed_tokens.weight"]), ref), name
    moved = _unit_deltas(model, exported, loaded)
    assert all(moved[k].equal(planted[k]) for k in planted)
    assert summary["frozen_max_abs_delta"] == 0.0 and summary["freeze"]["entries"]["trainable_share"] < 0.05


def test_planted_units_script_reports_per_map(unit_map, tmp_path):
    import importlib.util

    from conftest import ROOT

    from safety_units.units.unit_map import save_selection

    um = UnitMap.load(unit_map)
    planted = um.top("safety_minus_utility", {"mlp": 4, "attn": 2})
    save_selection(planted, tmp_path / "trained_units.safetensors", {"role": "trained", "random_share": 0.01,
                                                                      "seed": 0})
    spec = importlib.util.spec_from_file_location("planted_units", ROOT / "scripts" / "planted_units.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.main([str(tmp_path), unit_map, "--labels", "own", "--out", str(tmp_path / "p.md")])
    by_safety = um.top("safety", {"mlp": 4, "attn": 2})
    hits = sum(int((by_safety[k] & planted[k]).sum()) for k in planted)
    assert f"| own | safety_minus_utility | 6 | 6 | 1.000 | 1.000 | {6 / 384:.3f} |" in text
    assert f"| own | safety | 6 | {hits} | {hits / 6:.3f} | {hits / 6:.3f} |" in text
    assert (tmp_path / "p.md").read_text() == text
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "nowhere"), unit_map])


@pytest.mark.parametrize("overrides,match", [
    (["freeze.unit_map={map}"], "exactly one of freeze.classes"),
    (["freeze.unit_map={map}", "freeze.classes=[esu]", "freeze.random_share=0.02"], "exactly one of freeze.classes"),
    (["freeze.unit_map={map}", "freeze.classes=[safety]"], r"freeze.classes: unknown unit class\(es\) \['safety'\]"),
    (["freeze.random_share=1.5"], "freeze.random_share must be a share of units in"),
    (["freeze.random_share=0.001"], "freeze.random_share=0.001 selects no unit"),
    (["freeze.classes=[esu]"], "needs a unit map"),
])
def test_train_only_errors(unit_map, tmp_path, overrides, match):
    tiny = build_tiny(cache_dir=compose("train", ["model=tiny"]).paths.cache_dir)
    cfg = train_cfg(tmp_path, "freeze=train_only", *[o.format(map=unit_map) for o in overrides])
    with pytest.raises(ConfigError, match=match):
        build_masker(cfg, tiny.model)


def test_layers_like_esu_cu_freezes_the_middle_block_closest_in_entries(unit_map, tmp_path):
    model = build_tiny(cache_dir=compose("train", ["model=tiny"]).paths.cache_dir).model
    esu_cu, _ = build_masker(train_cfg(tmp_path, "freeze=esu_cu", f"freeze.unit_map={unit_map}"), model)
    target = esu_cu.describe()["entries"]["frozen"]
    masker, _ = build_masker(train_cfg(tmp_path, "freeze=layers", "freeze.layers_like=esu_cu",
                                       f"freeze.unit_map={unit_map}"), model)
    d = masker.describe()
    assert d["like_entries"] == target and d["layers_like"] == "esu_cu"
    per_layer = [sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"model.layers.{i}."))
                 for i in range(2)]
    candidates = {(0,): per_layer[0], (0, 1): sum(per_layer)}  # 2 layers: middle block of size 1 or 2
    best = min(candidates, key=lambda c: abs(candidates[c] - target))
    assert tuple(d["layers"]) == best and d["entries"]["frozen"] == candidates[best]
    with pytest.raises(ConfigError, match="layers_like must be esu or esu_cu"):
        build_masker(train_cfg(tmp_path, "freeze=layers", "freeze.layers_like=ru_only", f"freeze.unit_map={unit_map}"),
                     model)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny random Mixtral with the SmolLM2 tokenizer, saved as an HF directory."""
    path = tmp_path_factory.mktemp("moe")
    tok = build_tiny(cache_dir=compose("train", ["model=tiny"]).paths.cache_dir).tokenizer
    tiny_mixtral(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_an_moe_model_attributes_and_trains_around_its_esu_cu_experts(tiny_moe, tmp_path, adapter):
    """attribute.py then train.py freeze=esu_cu units.router=freeze on a Mixtral, full fine-tuning and LoRA: the
    exported model keeps every frozen expert channel and both routers bit-identical, and the rest trains."""
    cal = ["calibration.nsamples=8", "calibration.batch_size=4", "calibration.max_length=64"]
    out = run_attribution(compose("attribute", ["model=hf", f"model.path={tiny_moe}", "scoring=wifv", *cal],
                                  output_dir=tmp_path / "map"))
    um = UnitMap.load(out["unit_map"])
    assert um.kinds == ["attn", "expert"] and um.select("esu")["expert.1"].any()
    cfg = train_cfg(tmp_path / "run", *EXACT, "model=hf", f"model.path={tiny_moe}", "freeze=esu_cu",
                    f"freeze.unit_map={out['unit_map']}", "units.router=freeze", f"adapter={adapter}",
                    "trainer.max_steps=3")
    summary = run_train(cfg)
    assert summary["frozen_max_abs_delta"] == 0.0 and summary["trainable_changed"]
    assert summary["freeze"]["router"] == "freeze"
    base = AutoModelForCausalLM.from_pretrained(tiny_moe)
    masker, _ = build_masker(cfg, base)
    # transformers saves Mixtral in its per-expert checkpoint layout and loads it back into the 3-D tensors
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").state_dict()
    assert masker.frozen_max_abs_delta(exported) == 0.0
    assert {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"} <= masker.frozen_full
    moved = [n for n, p in base.state_dict().items() if n in exported and not torch.equal(exported[n], p)]
    assert any("self_attn" in n for n in moved)
    assert any("experts" in n for n in moved) == (adapter == "none")  # LoRA leaves the 3-D experts alone
