"""Cost of each scorer, relative to wifv, in one run: a whole attribution (safety and utility side, classification;
for contrast also loading its reference model) on the same model and calibration data.

    python benchmarks/scorers.py --model-path <aligned HF dir> [--nsamples 32] [--max-length 128] [--threads 1]
                                 [--json cost.json] [--scorers wifv atp ...] [-- <more attribute.py overrides>]

Scorers: wifv (tokens=all and tokens=decision), activation (tokens=decision), snip, contrast, refusal_direction
(the settings of results/attribution_validity.md), delta, atp and mask at their config defaults, and mask, atp and
activation (tokens=decision) with attention heads as units. Each runs `attribution.attribute` in a fresh subprocess; time
counts from the call (the model loaded, one warm-up forward done) to its return, and peak extra memory is peak RSS
minus RSS just before, sampled every 2 ms (MALLOC_MMAP_THRESHOLD_ makes glibc hand large freed blocks back at
once). Prints a table: samples scored per second (both sides) and peak extra MB, each also as a ratio to wifv.
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

from safety_units.attribution.pipeline import SCORER_RUNS  # noqa: E402

SCORERS = {
    **SCORER_RUNS,
    "mask_heads": ["scoring=mask", "units.heads=true"],
    "atp_heads": ["scoring=atp", "units.heads=true"],
    "activation_decision_heads": ["scoring=activation", "scoring.tokens=decision", "units.heads=true"],
}


def worker(name: str, overrides: list[str]) -> dict:
    import torch

    from safety_units.attribution.pipeline import attribute, attribution_config
    from safety_units.models.loading import load_model

    cfg = attribution_config([*SCORERS[name], *overrides])
    loaded = load_model(cfg.model)
    probe = loaded.tokenizer("Hello there", return_tensors="pt")
    with torch.no_grad():  # warm-up: one-time kernel and thread-pool allocations do not count
        loaded.model(**probe)
    seconds, peak_mb = timed_peak(lambda: attribute(loaded, cfg))
    n = 2 * int(cfg.calibration.nsamples)  # safety + utility side
    return {"scorer": name, "samples_per_s": n / seconds, "peak_extra_mb": peak_mb,
            "seconds": seconds, "samples": n}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True,
                    help="an aligned model dir (model=hf model.path=...); contrast compares it with the shipped SmolLM2")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (OMP_NUM_THREADS)")
    ap.add_argument("--json", help="also write the measured rows to this JSON file (for reports)")
    ap.add_argument("--scorers", nargs="+", choices=sorted(SCORERS), default=list(SCORERS),
                    help="which scorers to run (default: all; wifv, the baseline, always runs)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="more attribute.py overrides, after --")
    args = ap.parse_args()
    if not Path(args.model_path).is_dir():
        sys.exit(f"--model-path {args.model_path} is not a model directory (e.g. logs/align_full/model).")
    overrides = ["model=hf", f"model.path={Path(args.model_path).resolve()}"] + [
        f"calibration.nsamples={args.nsamples}", f"calibration.max_length={args.max_length}", *args.overrides]
    if args.worker:
        print(json.dumps(worker(args.worker, overrides)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    rows = {}
    for name in dict.fromkeys(["wifv", *args.scorers]):
        res = subprocess.run([sys.executable, __file__, "--worker", name, "--model-path", args.model_path,
                              "--nsamples", str(args.nsamples), "--max-length", str(args.max_length),
                              "--", *args.overrides],
                             check=False, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            sys.exit(f"scorer {name} failed:\n{res.stderr[-3000:]}")
        rows[name] = json.loads(res.stdout.strip().splitlines()[-1])
    base = rows["wifv"]
    print(f"model={args.model_path} samples per side={args.nsamples} max_length={args.max_length} "
          f"threads={args.threads}")
    print("| scorer | samples/s | throughput vs wifv | peak extra MB | memory vs wifv | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base['samples_per_s']:.2f}x | "
              f"{r['peak_extra_mb']:.0f} | {r['peak_extra_mb'] / max(base['peak_extra_mb'], 1e-9):.2f}x | "
              f"{r['seconds']:.1f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": {"model": args.model_path, "threads":
                                               args.threads, "nsamples": args.nsamples, "max_length": args.max_length,
                                               "overrides": args.overrides}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
