"""Freezing strategies: frozen entries bit-identical to the loaded weights, trainable entries move."""
from pathlib import Path

import pytest
import torch
from conftest import compose, train_cfg
from safetensors.torch import load_file

from safety_units.attribution import run_attribution
from safety_units.errors import ConfigError, UnitMapError
from safety_units.masking import Masker, build_masker, masks_from_selection
from safety_units.models import build_tiny
from safety_units.training import run_train
from safety_units.unit_map import UnitMap

EXACT = ["optim.weight_decay=0.1", "optim.lr=5e-3", "trainer.accumulate_grad_batches=2",
         "trainer.gradient_clip_val=0.5", "trainer.max_steps=4"]


@pytest.fixture(scope="module")
def unit_map(tmp_path_factory):
    out = tmp_path_factory.mktemp("map")
    cfg = compose("attribute", ["model=tiny", "calibration.nsamples=16", "calibration.max_length=64"],
                  output_dir=out)
    return run_attribution(cfg)["unit_map"]


def _loaded_weights():
    cache = compose("train", ["model=tiny"]).paths.cache_dir
    return {k: v.clone() for k, v in build_tiny(cache_dir=cache).model.state_dict().items()}


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
], ids=["esu", "esu_cu", "ru_only", "random_like_esu_cu", "random_like_ru_only", "layers", "esu_cu_forward_masks",
        "esu_cu_bf16_mixed"])
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


def test_without_masked_decay_adamw_moves_frozen_entries(unit_map, tiny):
    """The reason for the masked decay: hooks alone leave AdamW's decoupled decay on frozen entries."""
    selection = UnitMap.load(unit_map, model=tiny.model).esu_plus_top_cu(0.075)
    partial, full = masks_from_selection(tiny.model, selection, "freeze")
    masker = Masker(tiny.model, partial, full)
    masker.attach(tiny.model)
    opt = torch.optim.AdamW([p for p in tiny.model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 1000, (2, 16))
    for _ in range(3):
        opt.zero_grad()
        tiny.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert masker.frozen_max_abs_delta(tiny.model.state_dict()) > 0.0


def test_ddp_spawn_two_processes_keeps_exactness(unit_map, tmp_path):
    cfg = train_cfg(tmp_path, *EXACT, "trainer=ddp_spawn", "freeze=esu_cu", f"freeze.unit_map={unit_map}",
                    "trainer.max_steps=3")
    run_train(cfg)
    exported = load_file(tmp_path / "model" / "model.safetensors")
    masker, _ = build_masker(cfg, build_tiny(cache_dir=cfg.paths.cache_dir).model)
    frozen, trainable = _frozen_and_trainable_deltas(masker, exported, _loaded_weights())
    assert frozen == 0.0 and trainable > 1e-4


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
    _, path1 = build_masker(cfg, tiny.model, tiny.tokenizer)
    assert str(path1).startswith(str(cache / "unit_maps"))
    mtime = Path(path1).stat().st_mtime_ns
    _, path2 = build_masker(cfg, tiny.model, tiny.tokenizer)
    assert path2 == path1 and Path(path2).stat().st_mtime_ns == mtime


def test_periodic_frozen_check_is_logged(unit_map, tmp_path):
    import csv

    run_train(train_cfg(tmp_path, *EXACT, "freeze=esu", f"freeze.unit_map={unit_map}", "freeze.check_every_n_steps=2"))
    rows = [r for r in csv.DictReader(open(tmp_path / "csv" / "metrics.csv")) if r.get("freeze/frozen_max_abs_delta")]
    assert len(rows) >= 1 and all(float(r["freeze/frozen_max_abs_delta"]) == 0.0 for r in rows)
