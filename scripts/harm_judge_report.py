"""Validate harmfulness judges on the held-out half of BeaverTails 30k_test: results/harm_judge.{json,md}
(safety_units.experiments.judges.harm_report says how).

    python scripts/harm_judge_report.py                       # every held-out pair (the probe trains once)
    python scripts/harm_judge_report.py --limit 200           # a seeded subsample, for a quick look
    python scripts/harm_judge_report.py harm_judge.layer=0.5  # overrides of conf/harm_judge/probe.yaml
    python scripts/harm_judge_report.py --md-only             # rebuild the markdown from the JSON
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
    ap.add_argument("overrides", nargs="*", help="harm_judge.<key>=<value> overrides of conf/harm_judge/probe.yaml")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results")
    ap.add_argument("--limit", type=int, default=None, help="a seeded subsample of this many held-out pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cut-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    ap.add_argument("--md-only", action="store_true", help="rebuild harm_judge.md from harm_judge.json")
    args = ap.parse_args(argv)
    md = write_report(args.out_dir, args.md_only, overrides=args.overrides, limit=args.limit, seed=args.seed,
                      cut_tokens=args.cut_tokens, threads=args.threads)
    print(md)
    print(f"wrote {args.out_dir / 'harm_judge.json'} and {args.out_dir / 'harm_judge.md'}")
    return md


if __name__ == "__main__":
    main()
