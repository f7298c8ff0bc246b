"""Validate the harm-judge candidates out of fold on every labelled BeaverTails 30k_test pair, cache their final
heads, judge XSTest: results/harm_judge.{json,md} (safety_units.experiments.judges.harm_report says how).

    python scripts/harm_judge_report.py                        # cross-fit every candidate (about an hour, 2 cores)
    python scripts/harm_judge_report.py harm_judge.seed=1      # overrides of conf/harm_judge/*.yaml
    python scripts/harm_judge_report.py --md-only              # rebuild the markdown from the JSON
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.experiments.judges.harm_report import write_report
from safety_units.utils.errors import friendly_errors

ROOT = Path(__file__).resolve().parents[1]


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="harm_judge.<key>=<value> overrides of every candidate's config")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cut-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--raw", type=Path, help="a saved cross-fitting JSON (harm_crossfit.crossfit's output) to reuse")
    ap.add_argument("--md-only", action="store_true", help="rebuild harm_judge.md from harm_judge.json")
    args = ap.parse_args(argv)
    md = write_report(args.out_dir, args.md_only, **({} if args.md_only else dict(
        overrides=args.overrides, k=args.folds, cut_tokens=args.cut_tokens, threads=args.threads, raw=args.raw)))
    print(md)
    print(f"wrote {args.out_dir / 'harm_judge.json'} and {args.out_dir / 'harm_judge.md'}")
    return md


if __name__ == "__main__":
    main()
