"""A first look at scoring=mask on an aligned SmolLM2 (issue 23): results/mask_preliminary.md from the runs shipped
beside it (safety_units.experiments.validity.mask_preliminary: the runs it reads, the goal's criteria).

    python scripts/mask_preliminary.py [--runs results/mask_preliminary/runs] [--out results/mask_preliminary.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.experiments.validity.mask_preliminary import write_report
from safety_units.utils.errors import friendly_errors

ROOT = Path(__file__).resolve().parents[1]


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=ROOT / "results" / "mask_preliminary" / "runs")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "mask_preliminary.md")
    args = ap.parse_args(argv)
    text = write_report(args.runs, args.out)
    print(text)
    return text


if __name__ == "__main__":
    main()
