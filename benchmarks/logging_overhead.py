"""What a run's logging costs, as a share of its wall time, measured in one run (goal: < 2% of a quickstart;
safety_units.experiments.benchmarks.logging_overhead: what is timed).

    python benchmarks/logging_overhead.py                                  # the quickstart (minutes on CPU)
    python benchmarks/logging_overhead.py --json out.json -- trainer.max_steps=5   # any train.py overrides
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from safety_units.experiments.benchmarks.logging_overhead import measure, summary_line  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "logs" / "benchmarks" / "logging_overhead"), help="the run dir")
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = ap.parse_args(argv)
    result = measure(args.overrides, Path(args.out))
    print(summary_line(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
