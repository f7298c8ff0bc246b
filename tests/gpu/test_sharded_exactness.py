"""Exactness of freezing under DeepSpeed ZeRO-1/2/3 and FSDP, and of adapter=lora under DDP and ZeRO-2 -- needs a
CUDA GPU (one is enough: the sharding code paths run with a world size of 1).

    pytest -m gpu tests/gpu -s                     # asserts max |delta| == 0 and prints it per strategy
    python tests/gpu/test_sharded_exactness.py     # prints the table only

The model is loaded in bf16 (model.dtype=bfloat16): DeepSpeed keeps an fp32 master built from the bf16 module, so
frozen entries are compared in the dtype the model was loaded in.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_unit_map, train_cfg  # noqa: E402

STRATEGIES = ["gpu", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]
LORA_STRATEGIES = ["ddp", "deepspeed_zero2"]
pytestmark = pytest.mark.gpu


def run_strategy(strategy: str, unit_map: str, out: Path, *extra: str, freeze: str = "esu_cu") -> dict:
    from safety_units.training import run_train

    cfg = train_cfg(out, f"trainer={strategy}", "trainer.devices=1", "model.dtype=bfloat16", f"freeze={freeze}",
                    f"freeze.unit_map={unit_map}", "optim.weight_decay=0.1", "optim.lr=5e-3",
                    "trainer.gradient_clip_val=0.5", "trainer.max_steps=4",
                    *(["trainer.accumulate_grad_batches=2"] if strategy != "fsdp" else []), *extra)
    return run_train(cfg)


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


if __name__ == "__main__":
    import tempfile

    root = Path(tempfile.mkdtemp())
    um = tiny_unit_map(root / "map")
    rows = []
    for s in STRATEGIES:
        try:
            summ = run_strategy(s, um, root / s)
            rows.append((s, summ["frozen_max_abs_delta"], summ["trainable_changed"]))
        except Exception as e:  # noqa: BLE001 - report every strategy
            rows.append((s, f"FAILED: {type(e).__name__}: {e}", ""))
    print("\n| strategy | frozen max abs delta | trainable changed |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
