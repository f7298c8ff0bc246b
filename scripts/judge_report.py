"""Validate the refusal judges against human labels and reference sets: results/judges.md
(safety_units.experiments.judges.refusal_report says which sets and how).

    python scripts/judge_report.py                      # strings, patterns, probe, ensemble (probe trains once)
    python scripts/judge_report.py --judges strings patterns
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.experiments.judges.refusal_report import JUDGES, write_report
from safety_units.utils.errors import friendly_errors

ROOT = Path(__file__).resolve().parents[1]


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judges", nargs="+", default=list(JUDGES))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "judges.md")
    args = ap.parse_args(argv)
    text = write_report(args.judges, args.out)
    print(text)
    print(f"\nwrote {args.out}")
    return text


if __name__ == "__main__":
    main()
