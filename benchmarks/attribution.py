"""Attribution cost per method (wifv, activation, snip against a per-weight naive SNIP), in one run on the same
model and samples: throughput and peak extra memory (safety_units.experiments.benchmarks.attribution_cost).

    python benchmarks/attribution.py [--model smollm2|tiny] [--nsamples 32] [--batch 4] [--max-length 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.experiments.benchmarks.attribution_cost import compare, table
from safety_units.utils.errors import friendly_errors

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "safety_tuned_llamas" / "safety_only_data_Instructions.json"


@friendly_errors
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args(argv)
    rows = compare(args.model, str(DATA), args.nsamples, args.batch, args.max_length)
    print(table(rows, args.batch, args.max_length, args.model))
    return rows


if __name__ == "__main__":
    main()
