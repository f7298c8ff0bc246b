"""Step time of masked training (freeze 7.5% of units) relative to unmasked training, in one run.

    python benchmarks/mask_overhead.py                 # SmolLM2-135M on CPU (goal: ratio <= 1.10; LoRA <= 1.05)
    python benchmarks/mask_overhead.py --device cuda   # (goal: ratio <= 1.03)
    python benchmarks/mask_overhead.py --model tiny --steps 2   # a quick check that it runs

Two arms, each masked vs unmasked: full fine-tuning, and LoRA (`adapter=lora` defaults) where the masks hold the
adapter's B rows / A columns of frozen slices at zero. All variants run the same AdamW step (weight decay 0.1,
grad clipping) on the same batch, interleaved, and the median step times are compared. The masked variants pay for
the gradient hooks and the masked weight decay.
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

from safety_units.models.lora import LoraAdapter  # noqa: E402
from safety_units.units.masking import Masker, masks_from_selection  # noqa: E402
from safety_units.models.loading import build_tiny, load_smollm2  # noqa: E402
from safety_units.units.groups import resolve_units  # noqa: E402

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


def build_variant(load, arm: str, masked: bool, mechanism: str, device: str):
    """(model, masker acting on the trained parameters, masker whose snapshot is the loaded weights, adapter)."""
    model = load()
    check = adapter = None
    if masked:
        partial, full = masks_from_selection(model, random_selection(model, 0.075), "freeze")
        check = Masker(model, partial, full, mechanism=mechanism)
    train = check
    if arm == "lora":
        adapter = LoraAdapter()
        model, train = adapter.wrap(model, check)
    model.to(device)
    if train is not None:
        train.attach(model)
    return model, train, check, adapter


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 1 warm-up each)")
    ap.add_argument("--mechanism", choices=["hook", "forward"], default="hook")
    ap.add_argument("--arms", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    args = ap.parse_args()
    torch.manual_seed(0)
    load = (lambda: load_smollm2(CACHE).model) if args.model == "smollm2" else (lambda: build_tiny(CACHE).model)
    variants = {(arm, masked): build_variant(load, arm, masked, args.mechanism, args.device)
                for arm in args.arms for masked in (False, True)}
    vocab = variants[(args.arms[0], False)][0].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps = {k: make_step(model, train, batch) for k, (model, train, _, _) in variants.items()}
    times = {k: [] for k in steps}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for k in steps:
        steps[k]()  # warm-up
    for _ in range(args.steps):
        for k in steps:  # interleaved: drift on a noisy machine hits every variant
            sync()
            t0 = time.perf_counter()
            steps[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model={args.model} device={args.device} batch={args.batch}x{args.seq} mechanism={args.mechanism} "
          f"steps={args.steps}")
    for arm in args.arms:
        model, _, check, adapter = variants[(arm, True)]
        sd = model.state_dict()
        weights = adapter.merged_state_dict(sd) if adapter is not None else sd  # LoRA: W + dW
        print(f"[{arm}] median step: unmasked {med[(arm, False)]:.4f}s  masked {med[(arm, True)]:.4f}s")
        print(f"[{arm}] masked/unmasked step-time ratio: {med[(arm, True)] / med[(arm, False)]:.3f}")
        print(f"[{arm}] frozen_max_abs_delta after {args.steps + 1} masked steps: "
              f"{check.frozen_max_abs_delta(weights)}")

if __name__ == "__main__":
    main()
