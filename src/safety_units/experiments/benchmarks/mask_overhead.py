"""Step time of masked training (7.5% of units frozen) relative to unmasked training, in one run
(benchmarks/mask_overhead.py is the command line). Goals: ratio <= 1.10 on CPU (LoRA <= 1.05), <= 1.03 on CUDA.

Two arms, each masked vs unmasked: full fine-tuning, and LoRA (`adapter=lora` defaults) where the masks hold the
adapter's B rows / A columns of frozen slices at zero. All variants run the same AdamW step (weight decay 0.1,
grad clipping) on the same batch, interleaved (drift on a noisy machine hits every variant), and the median step
times are compared. The masked variants pay for the gradient hooks and the masked weight decay. The frozen entries'
largest change after the timed steps is reported too (it must be 0).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from safety_units.models.loading import build_tiny, load_smollm2
from safety_units.models.lora import LoraAdapter
from safety_units.units.groups import resolve_units
from safety_units.units.masking import Masker, masks_from_selection

CACHE = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))
FROZEN_SHARE = 0.075


def random_selection(model, share: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {grp.key: torch.rand(grp.n, generator=g) < share for grp in resolve_units(model)}


def make_step(model, masker, batch, lr=1e-5, wd=0.1):
    """One training step as the LightningModule takes it: AdamW, masked weight decay, gradient clipping."""
    masked_ids = masker.partially_masked_params(model) if masker else set()
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and id(p) not in masked_ids]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
    if masked_ids:
        groups.append({"params": [p for p in model.parameters() if id(p) in masked_ids], "weight_decay": 0.0,
                       "masked_weight_decay": wd})
    opt = torch.optim.AdamW(groups, lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        if masker:
            masker.apply_masked_weight_decay(opt, model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def build_variant(load, arm: str, masked: bool, mechanism: str, device: str):
    """(model, masker acting on the trained parameters, masker whose snapshot is the loaded weights, adapter)."""
    model = load()
    check = adapter = None
    if masked:
        partial, full = masks_from_selection(model, random_selection(model, FROZEN_SHARE), "freeze")
        check = Masker(model, partial, full, mechanism=mechanism)
    train = check
    if arm == "lora":
        adapter = LoraAdapter()
        model, train = adapter.wrap(model, check)
    model.to(device)
    if train is not None:
        train.attach(model)
    return model, train, check, adapter


def measure(model_name: str, device: str, batch_size: int, seq: int, steps: int, mechanism: str,
            arms: list[str]) -> dict[str, dict]:
    """arm -> median step seconds unmasked and masked, their ratio, and the frozen entries' largest change."""
    torch.manual_seed(0)
    load = (lambda: load_smollm2(CACHE).model) if model_name == "smollm2" else (lambda: build_tiny(CACHE).model)
    variants = {(arm, masked): build_variant(load, arm, masked, mechanism, device)
                for arm in arms for masked in (False, True)}
    vocab = variants[(arms[0], False)][0].config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    step_fns = {k: make_step(model, train, batch) for k, (model, train, _, _) in variants.items()}
    times = {k: [] for k in step_fns}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for k in step_fns:
        step_fns[k]()  # warm-up
    for _ in range(steps):
        for k in step_fns:  # interleaved: drift on a noisy machine hits every variant
            sync()
            t0 = time.perf_counter()
            step_fns[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {}
    for arm in arms:
        model, _, check, adapter = variants[(arm, True)]
        sd = model.state_dict()
        weights = adapter.merged_state_dict(sd) if adapter is not None else sd  # LoRA: W + dW
        out[arm] = {"unmasked_s": med[(arm, False)], "masked_s": med[(arm, True)],
                    "ratio": med[(arm, True)] / med[(arm, False)],
                    "frozen_max_abs_delta": check.frozen_max_abs_delta(weights)}
    return out


def report(results: dict[str, dict], steps: int) -> str:
    lines = []
    for arm, r in results.items():
        lines += [f"[{arm}] median step: unmasked {r['unmasked_s']:.4f}s  masked {r['masked_s']:.4f}s",
                  f"[{arm}] masked/unmasked step-time ratio: {r['ratio']:.3f}",
                  f"[{arm}] frozen_max_abs_delta after {steps + 1} masked steps: {r['frozen_max_abs_delta']}"]
    return "\n".join(lines)
