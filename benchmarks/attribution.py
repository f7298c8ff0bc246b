"""Attribution cost per method, in one run on the same model and samples: throughput and peak extra memory.

    python benchmarks/attribution.py [--model smollm2|tiny] [--nsamples 32] [--batch 4] [--max-length 128]

Methods: wifv, activation, snip (ours: per-unit sums, one dense gradient alive at a time, activation
checkpointing) and `naive_snip`, the per-weight baseline that keeps dense gradients and a dense score tensor for
every weight (as Wei et al. do) and reduces to units only at the end.

Each method runs in a fresh subprocess; peak extra memory = peak RSS while scoring minus RSS just before (model
and batches loaded, one warm-up forward done), sampled every 2 ms. MALLOC_MMAP_THRESHOLD_ makes glibc return
large freed blocks to the OS at once, so RSS follows the live tensors instead of the allocator's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from peak_memory import timed_peak  # noqa: E402
CACHE = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))
METHODS = ["wifv", "activation", "snip", "naive_snip"]


def naive_snip(model, groups, batches):
    import torch

    dense = {s.name: torch.zeros_like(s.param, dtype=torch.float32) for g in groups for s in g.slices}
    params = dict(model.named_parameters())
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        for name, acc in dense.items():  # a score per weight, like Wei et al.
            acc += (params[name].detach() * params[name].grad).abs()
    out = {}
    for g in groups:
        out[g.key] = sum((dense[s.name].sum(dim=1 - s.dim) if dense[s.name].ndim == 2 else dense[s.name])
                         for s in g.slices)
    model.zero_grad(set_to_none=True)
    return out


def worker(method: str, model_name: str, nsamples: int, batch: int, max_length: int) -> dict:
    import torch

    from safety_units.data.calibration import calibration_batches
    from safety_units.models.loading import build_tiny, load_smollm2
    from safety_units.attribution.scoring import score_units
    from safety_units.units.groups import resolve_units

    loaded = load_smollm2(CACHE) if model_name == "smollm2" else build_tiny(CACHE)
    src = {"path": str(ROOT.parent / "shared/data/safety_tuned_llamas/safety_only_data_Instructions.json"),
           "prompt": "instruction", "input": "input", "response": "output"}
    batches = calibration_batches(loaded.tokenizer, src, nsamples, max_length, batch, 0, "safety")
    groups = resolve_units(loaded.model)
    with torch.no_grad():  # warm-up: one-time kernel and thread-pool allocations do not count
        loaded.model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    if method == "naive_snip":
        seconds, peak_mb = timed_peak(lambda: naive_snip(loaded.model, groups, batches))
    else:
        seconds, peak_mb = timed_peak(lambda: score_units(loaded.model, groups, batches, method, progress=False))
    n = sum(b["input_ids"].shape[0] for b in batches)
    return {"method": method, "samples_per_s": n / seconds, "peak_extra_mb": peak_mb,
            "seconds": seconds, "samples": n}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.nsamples, args.batch, args.max_length)))
        return
    rows = {}
    for m in METHODS:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        res = subprocess.run([sys.executable, __file__, "--worker", m, "--model", args.model, "--nsamples",
                              str(args.nsamples), "--batch", str(args.batch), "--max-length", str(args.max_length)],
                             capture_output=True, text=True, check=True, env=env)
        rows[m] = json.loads(res.stdout.strip().splitlines()[-1])
    base = rows["naive_snip"]
    print(f"model={args.model} samples={base['samples']} batch={args.batch} max_length={args.max_length}")
    print("| method | samples/s | throughput vs naive SNIP | peak extra MB | memory vs naive SNIP |")
    print("|---|---:|---:|---:|---:|")
    for m, r in rows.items():
        print(f"| {m} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base['samples_per_s']:.2f}x | "
              f"{r['peak_extra_mb']:.0f} | {r['peak_extra_mb'] / max(base['peak_extra_mb'], 1e-9):.3f} |")


if __name__ == "__main__":
    main()
