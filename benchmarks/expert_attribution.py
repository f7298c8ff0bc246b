"""Cost of attributing an MoE model's experts relative to a dense model of the same active size, in one run
(safety_units.experiments.benchmarks.expert_cost: the pair, what is timed and how).

    python benchmarks/expert_attribution.py [--layers 4] [--hidden 256] [--experts 8] [--top-k 2]
                                            [--expert-units 512] [--batches 4] [--seq 128] [--json cost.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.experiments.benchmarks.expert_cost import compare, table, write_json
from safety_units.utils.errors import friendly_errors


@friendly_errors
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-units", type=int, default=512, help="channels per expert (dense: top-k times this)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the settings and times to this JSON file")
    args = ap.parse_args(argv)
    result = compare(args.layers, args.hidden, args.heads, args.experts, args.top_k, args.expert_units,
                     args.batches, args.batch, args.seq, args.repeats)
    print(f"settings: {result['settings']}")
    print(table(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
