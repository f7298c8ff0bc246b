"""The quickstart's claim with its control, on identical prompts: results/quickstart.md
(safety_units.experiments.quickstart_report says how the two runs are made and compared).

    python scripts/quickstart_report.py logs/quickstart_ru logs/quickstart_random [--rejudge]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safety_units.experiments.quickstart_report import JUDGES, write_report
from safety_units.utils.errors import friendly_errors

ROOT = Path(__file__).resolve().parents[1]


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ru_run", type=Path)
    ap.add_argument("random_run", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "quickstart.md")
    ap.add_argument("--judges", nargs="+", default=list(JUDGES), help="judges whose agreement the report gives")
    ap.add_argument("--rejudge", action="store_true",
                    help="re-judge the refusal tasks' saved completions with the default judge (the runs' own "
                         "eval_*.json keep the judge they were run with; the copies get the new verdicts)")
    args = ap.parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    text = write_report(args.ru_run, args.random_run, args.out, args.judges, args.rejudge, command, ROOT)
    print(text)
    print(f"\nwrote {args.out}")
    return text


if __name__ == "__main__":
    main()
