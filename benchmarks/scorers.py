"""Cost of each scorer relative to wifv, in one run: a whole attribution on the same model and calibration data
(safety_units.experiments.benchmarks.scorer_cost: which scorers, how time and memory are measured).

    python benchmarks/scorers.py --model-path <aligned HF dir> [--nsamples 32] [--max-length 128] [--threads 1]
                                 [--json cost.json] [--scorers wifv atp ...] [-- <more attribute.py overrides>]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.experiments.benchmarks.scorer_cost import SCORERS, compare, table, write_json
from safety_units.utils.errors import ConfigError, friendly_errors


@friendly_errors
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, required=True,
                    help="an aligned model dir (model=hf model.path=...); contrast compares it with the shipped SmolLM2")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (OMP_NUM_THREADS)")
    ap.add_argument("--json", type=Path, help="also write the measured rows to this JSON file (for reports)")
    ap.add_argument("--scorers", nargs="+", choices=sorted(SCORERS), default=list(SCORERS),
                    help="which scorers to run (default: all; wifv, the baseline, always runs)")
    ap.add_argument("overrides", nargs="*", help="more attribute.py overrides, after --")
    args = ap.parse_args(argv)
    if not args.model_path.is_dir():
        raise ConfigError(f"--model-path {args.model_path} is not a model directory (e.g. logs/align_full/model).")
    rows = compare(args.model_path, args.scorers, args.nsamples, args.max_length, args.threads, args.overrides)
    print(f"model={args.model_path} samples per side={args.nsamples} max_length={args.max_length} "
          f"threads={args.threads}")
    print(table(rows))
    if args.json:
        write_json(args.json, rows, {"model": str(args.model_path), "threads": args.threads, "nsamples": args.nsamples,
                                     "max_length": args.max_length, "overrides": args.overrides})
    return rows


if __name__ == "__main__":
    main()
