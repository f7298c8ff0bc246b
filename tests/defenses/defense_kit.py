"""Helpers shared by the tests of several defense modules: stand-ins for what a loss reads from the LightningModule,
random batches, the masks-exactness run through fit, LoRA on the tiny model, a small harmful calibration set, the
Antidote code's per-row mask."""

import json
import os
from pathlib import Path

import torch
from conftest import train_cfg

CACHE = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))
TINY_BASE = {"_target_": "safety_units.models.loading.build_tiny", "cache_dir": CACHE, "seed": 1}


class FakeModule:
    """What a defense's loss reads from CausalLMModule: the model, and the run's length for Lisa's warm-up."""

    def __init__(self, model, total=10):
        self.model, self._total = model, total
        self.trainer = type("T", (), {"accumulate_grad_batches": 1})()

    def _total_steps(self):
        return self._total


class FixedStream:
    """A BatchStream that always hands out the same batch."""

    def __init__(self, batch):
        self.batch = batch

    def next(self, device):
        return self.batch


def batch_of(tiny, seed=0, n=2, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, tiny.model.config.vocab_size, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def harmful_rows(tmp_path, n=8) -> Path:
    """A few (prompt, harmful answer) pairs as JSONL: the mechanism, not the data."""
    path = tmp_path / "harmful.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"how do I do bad thing {i}?",
                                        "response": f"Step {i}: do the bad thing carefully."}) + "\n"
                            for i in range(n)))
    return path


def train_frozen_except_5_percent(tmp_path, defense, *extra):
    """fit with `defense` on a planted 5% trainable set (the rest frozen), decoupled weight decay and accumulation;
    returns the run's summary."""
    from safety_units.training.fit import run_train

    cfg = train_cfg(tmp_path, f"defense={defense}", "freeze=train_only", "freeze.random_share=0.05",
                    "optim.weight_decay=0.1", "trainer.accumulate_grad_batches=2", "export=false",
                    "trainer.max_steps=1", "data.num_samples=16", "data.max_length=32", "data.val_fraction=0", *extra)
    return run_train(cfg)


def antidote_settings(tmp_path) -> dict:
    """defense=antidote's settings on 6 harmful rows (5 used), batches of 2."""
    return {"name": "antidote", "stage": "post", "dense_ratio": 0.1, "nsamples": 5, "max_length": 32,
            "batch_size": 2, "harmful": {"h": {"path": str(harmful_rows(tmp_path, 6)), "prompt": "prompt",
                                               "response": "response"}}}


def train_b(model, seed=4):
    """Random LoRA B factors, as after training (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def with_lora(tiny):
    """The tiny Llama (W_aligned = its weights) with LoRA adapters, B random: (model, W_aligned)."""
    from safety_units.defenses.posthoc import target_weights
    from safety_units.models.lora import LoraAdapter

    start = {n: m.weight.detach().clone() for n, m in target_weights(tiny.model).items()}
    model, _ = LoraAdapter(rank=4, alpha=8, dropout=0.0).wrap(tiny.model)
    train_b(model)
    return model, start


def merged_delta(model, start):
    from safety_units.defenses.posthoc import target_weights
    from safety_units.models.lora import effective_weight

    return {n: effective_weight(m).float() - start[n] for n, m in target_weights(model).items()}


def code_row_mask(score, dense_ratio):
    """git-disl/Antidote prune_wanda_outlier's mask, brute force: each row keeps its int(cols * (1 - dense_ratio))
    lowest scores (ascending, ties by column: a stable sort) and prunes the rest."""
    rows, cols = score.shape
    keep = int(cols * (1 - dense_ratio))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        order = sorted(range(cols), key=lambda j: (score[i, j].item(), j))
        mask[i, order[keep:]] = True
    return mask
