"""Step time of masked training (freeze 7.5% of units) relative to unmasked training, full and LoRA, in one run
(safety_units.experiments.benchmarks.mask_overhead: the arms, how it is timed, the goals).

    python benchmarks/mask_overhead.py                 # SmolLM2-135M on CPU (goal: ratio <= 1.10; LoRA <= 1.05)
    python benchmarks/mask_overhead.py --device cuda   # (goal: ratio <= 1.03)
    python benchmarks/mask_overhead.py --model tiny --steps 2   # a quick check that it runs
"""

from __future__ import annotations

import argparse

from safety_units.experiments.benchmarks.mask_overhead import measure, report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 1 warm-up each)")
    ap.add_argument("--mechanism", choices=["hook", "forward"], default="hook")
    ap.add_argument("--arms", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    args = ap.parse_args(argv)
    results = measure(args.model, args.device, args.batch, args.seq, args.steps, args.mechanism, args.arms)
    print(f"model={args.model} device={args.device} batch={args.batch}x{args.seq} mechanism={args.mechanism} "
          f"steps={args.steps}")
    print(report(results, args.steps))
    return results


if __name__ == "__main__":
    main()
