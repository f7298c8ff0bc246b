"""Exactness of freezing under DeepSpeed ZeRO-1/2/3 and FSDP, and of adapter=lora under DDP, ZeRO-2 and FSDP -- needs
a CUDA GPU (one is enough: the sharding code paths run with a world size of 1; FSDP then uses NO_SHARD).

    pytest -m gpu tests/gpu -s                     # asserts max |delta| == 0 and prints it per strategy
    python tests/gpu/test_sharded_exactness.py     # prints the table only

The model is loaded in bf16 (model.dtype=bfloat16): DeepSpeed keeps an fp32 master built from the bf16 module, so
frozen entries are compared in the dtype the model was loaded in.

trainer=fsdp (issue 21) runs with clipping on (0.5 here; the trainer config's own 1.0 in the `defaults` case),
freeze=esu_cu and ru_only, freeze.mechanism=forward named explicitly, and adapter=lora; each fit is followed by
run_train's trainer.validate, which calls setup() again on the already wrapped model.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_unit_map, train_cfg  # noqa: E402

STRATEGIES = ["gpu", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]
LORA_STRATEGIES = ["ddp", "deepspeed_zero2", "fsdp"]
# trainer=fsdp beyond STRATEGIES' esu_cu row: label -> (freeze, extra overrides, keep the trainer config's clipping)
FSDP_CASES = {
    "ru_only": ("ru_only", [], False),
    "forward": ("esu_cu", ["freeze.mechanism=forward"], False),
    "defaults": ("esu_cu", [], True),  # conf/trainer/default.yaml's gradient_clip_val (1.0) and algorithm: no override
}
pytestmark = pytest.mark.gpu


def run_strategy(strategy: str, unit_map: str, out: Path, *extra: str, freeze: str = "esu_cu",
                 trainer_clipping: bool = False) -> dict:
    """A 4-step bf16 fit of model=tiny under `strategy` with AdamW wd 0.1 and clipping by norm (0.5, or the trainer
    config's own value with trainer_clipping=True)."""
    from safety_units.training.fit import run_train

    cfg = train_cfg(out, f"trainer={strategy}", "trainer.devices=1", "model.dtype=bfloat16", f"freeze={freeze}",
                    f"freeze.unit_map={unit_map}", "optim.weight_decay=0.1", "optim.lr=5e-3",
                    *([] if trainer_clipping else ["trainer.gradient_clip_val=0.5"]), "trainer.max_steps=4",
                    *(["trainer.accumulate_grad_batches=2"] if strategy != "fsdp" else []), *extra)
    if trainer_clipping:
        assert cfg.trainer.gradient_clip_val and cfg.trainer.gradient_clip_val > 0  # clipping stays on
    return run_train(cfg)


def cases() -> list[tuple[str, str, tuple, dict]]:
    """Every row of the table: (label, strategy, extra overrides, run_strategy keywords)."""
    out = [(s, s, (), {}) for s in STRATEGIES]
    out += [(f"{s} + lora + {f}", s, ("adapter=lora",), {"freeze": f}) for s in LORA_STRATEGIES
            for f in ("esu_cu", "ru_only")]
    out += [(f"fsdp {label}", "fsdp", tuple(extra), {"freeze": f, "trainer_clipping": keep})
            for label, (f, extra, keep) in FSDP_CASES.items()]
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_entries_exact_on_gpu(strategy, unit_map, tmp_path):
    summary = run_strategy(strategy, unit_map, tmp_path)
    print(f"{strategy}: frozen_max_abs_delta = {summary['frozen_max_abs_delta']!r}, "
          f"trainable changed = {summary['trainable_changed']}")
    assert summary["frozen_max_abs_delta"] == 0.0
    assert summary["trainable_changed"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", LORA_STRATEGIES)
@pytest.mark.parametrize("freeze", ["esu_cu", "ru_only"])
def test_lora_merged_frozen_slices_exact_on_gpu(strategy, freeze, unit_map, tmp_path):
    """adapter=lora: the merged export keeps every frozen slice bit-identical (checked against the loaded weights)."""
    summary = run_strategy(strategy, unit_map, tmp_path, "adapter=lora", freeze=freeze)
    print(f"{strategy} + lora + {freeze}: frozen_max_abs_delta = {summary['frozen_max_abs_delta']!r}")
    assert summary["frozen_max_abs_delta"] == 0.0
    assert summary["trainable_changed"]
    assert (tmp_path / "model" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("label", list(FSDP_CASES))
def test_fsdp_cases_exact_on_gpu(label, unit_map, tmp_path):
    """trainer=fsdp with ru_only, the forward mechanism named explicitly, and the trainer config's own clipping."""
    freeze, extra, keep = FSDP_CASES[label]
    summary = run_strategy("fsdp", unit_map, tmp_path, *extra, freeze=freeze, trainer_clipping=keep)
    print(f"fsdp {label}: frozen_max_abs_delta = {summary['frozen_max_abs_delta']!r}, "
          f"trainable changed = {summary['trainable_changed']}")
    assert summary["global_step"] == 4
    assert summary["frozen_max_abs_delta"] == 0.0
    assert summary["trainable_changed"]


if __name__ == "__main__":
    import re
    import tempfile
    import time

    root = Path(tempfile.mkdtemp())
    um = tiny_unit_map(root / "map")
    rows = []
    for label, s, extra, kw in cases():
        t0 = time.perf_counter()
        try:
            summ = run_strategy(s, um, root / re.sub(r"\W+", "_", label), *extra, **kw)
            rows.append((label, summ["frozen_max_abs_delta"], summ["trainable_changed"]))
        except Exception as e:  # noqa: BLE001 - report every case
            rows.append((label, f"FAILED: {type(e).__name__}: {e}", ""))
        print(f"{label}: {rows[-1][1]!r} ({time.perf_counter() - t0:.1f} s)", flush=True)
    print("\n| strategy | frozen max abs delta | trainable changed |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
