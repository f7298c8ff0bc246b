"""Jain et al.'s synthetic testbed (issue 27): pretrain model=synthetic (cached, resumable), safety fine-tune it with
sft, dpo and unlearning x seeds, then refusal per input group, separation per block, the MLP updates' null-space
share and jailbreak placement; plant a unit set S (only S trains) and measure every scorer's top-|S| precision
against it -> results/jain_testbed.md.

    python scripts/run_jain_testbed.py [--seeds 0 1 2] [--objectives sft dpo unlearning] [--set KEY=VALUE ...]
    python scripts/run_jain_testbed.py --report-only

--model-set overrides the model config (e.g. model.pretraining.steps=2000); --set the fine-tunes' (e.g.
trainer.max_epochs=2). Each fine-tune writes <out>/<objective>_s<seed>.json and is skipped when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.utils.errors import friendly_errors  # noqa: E402


@friendly_errors
def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", nargs="+", default=["sft", "dpo", "unlearning"],
                    choices=["sft", "dpo", "unlearning"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--eval-per-group", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "logs" / "jain_testbed")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "results")
    ap.add_argument("--report-name", default="jain_testbed")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-planted", action="store_true", help="skip the scorers' ground truth (planted set S)")
    ap.add_argument("--scorers", nargs="+", help="only these scorers on the planted model (default: all)")
    ap.add_argument("--planted-set", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides of the planted fine-tune only (after --set)")
    args = ap.parse_args(argv)
    from safety_units.experiments.synthetic.testbed import run_testbed, write_report

    if not args.report_only:
        data = run_testbed(args.model_set, args.objectives, args.seeds, args.out, args.extra, args.eval_per_group,
                           planted=not args.no_planted, scorers=args.scorers,
                           planted_overrides=[*args.extra, *args.planted_set])
        (args.results_dir / args.report_name).mkdir(parents=True, exist_ok=True)
        (args.results_dir / args.report_name / "testbed.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {write_report(args.results_dir, args.report_name)}")


if __name__ == "__main__":
    main()
