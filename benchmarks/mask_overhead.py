"""Step time of masked training (freeze ESU + top CU, 7.5%) relative to unmasked training, in one run.

    python benchmarks/mask_overhead.py                 # SmolLM2-135M on CPU (goal: ratio <= 1.10)
    python benchmarks/mask_overhead.py --device cuda   # (goal: ratio <= 1.03)

Both variants run the same AdamW step (weight decay 0.1, grad clipping) on the same batch, interleaved, and the
median step times are compared. The masked variant pays for the gradient hooks and the masked weight decay.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safety_units.masking import Masker, masks_from_selection  # noqa: E402
from safety_units.models import build_tiny, load_smollm2  # noqa: E402
from safety_units.units import resolve_units  # noqa: E402

CACHE = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))


def random_selection(model, share: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {grp.key: torch.rand(grp.n, generator=g) < share for grp in resolve_units(model)}


def make_step(model, masker, batch, lr=1e-5, wd=0.1):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 1 warm-up each)")
    ap.add_argument("--mechanism", choices=["hook", "forward"], default="hook")
    args = ap.parse_args()
    torch.manual_seed(0)
    load = (lambda: load_smollm2(CACHE).model) if args.model == "smollm2" else (lambda: build_tiny(CACHE).model)
    models = {"unmasked": load().to(args.device), "masked": load().to(args.device)}
    sel = random_selection(models["masked"], 0.075)
    partial, full = masks_from_selection(models["masked"], sel, "freeze")
    masker = Masker(models["masked"], partial, full, mechanism=args.mechanism)
    masker.attach(models["masked"])
    vocab = models["masked"].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps = {"unmasked": make_step(models["unmasked"], None, batch), "masked": make_step(models["masked"], masker, batch)}
    times = {k: [] for k in steps}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for k in steps:
        steps[k]()  # warm-up
    for _ in range(args.steps):
        for k in steps:  # interleaved: drift on a noisy machine hits both variants
            sync()
            t0 = time.perf_counter()
            steps[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    delta = masker.frozen_max_abs_delta(models["masked"].state_dict())
    print(f"model={args.model} device={args.device} batch={args.batch}x{args.seq} mechanism={args.mechanism} "
          f"steps={args.steps}")
    print(f"median step: unmasked {med['unmasked']:.4f}s  masked {med['masked']:.4f}s")
    print(f"masked/unmasked step-time ratio: {med['masked'] / med['unmasked']:.3f}")
    print(f"frozen_max_abs_delta after {args.steps + 1} masked steps: {delta}")


if __name__ == "__main__":
    main()
