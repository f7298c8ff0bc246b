"""The Superficial Safety Alignment Hypothesis study (v2) on SmolLM2-135M-Instruct, end to end (the stages, the
runner and the report: safety_units.experiments.study).

    python scripts/run_study.py --scale gpu                 # one GPU, bf16-mixed, 3 worker processes
    python scripts/run_study.py --scale cpu --resume        # 2 CPU cores, reduced sizes, 2 one-thread workers
    python scripts/run_study.py --scale cpu --workers 1     # everything in this process
    python scripts/run_study.py --list                      # the stages, in run order
    python scripts/run_study.py --only '^c_alpaca_' --resume  # some stages (a regular expression on names)
    python scripts/run_study.py --report-only               # rebuild results/ssah_smollm2.md from the artifacts

Each finished stage leaves <study>/<stage>.stage.json with its config hash and seconds: --resume skips a stage only
when its output exists and the hash matches. --budget-minutes stops starting stages after that long (the rest: "not
run"). After the setup stages, --workers processes take the other stages from a queue.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.utils.errors import friendly_errors
from safety_units.experiments.study.cli import exit_on_failures, judge_harm, list_stages, run_stages, runner_parser
from safety_units.experiments.study.plan import SCALES, STUDY_NAME, plan

RESULTS = ROOT / "results"
V1_REPORT = RESULTS / "ssah_smollm2_v1.md"


@friendly_errors
def main(argv: list[str] | None = None):
    ap = runner_parser(__doc__, SCALES, "--study-dir", ROOT / "logs" / STUDY_NAME, RESULTS, "ssah_smollm2")
    ap.add_argument("--judge-harm", metavar="REGEX", nargs="?", const=r"^a_",
                    help="before the report, judge the saved harmful completions of the matching stages (default: "
                         "claim (a)'s) with the harm probe: the report's HS column")
    args = ap.parse_args(argv)
    scale, study = SCALES[args.scale], args.run_dir.resolve()
    if args.list:
        return list_stages(plan(scale, str(study)), 32)
    record = {} if args.report_only else run_stages(args, scale, study, "study")
    if args.judge_harm:
        print(f"harm-judged {judge_harm(study, args.judge_harm, args.extra)} stage(s)", flush=True)
    if not args.no_report:
        from safety_units.experiments.study.report import write_report

        print(f"wrote {write_report(study, args.results_dir, V1_REPORT, args.report_name)}", flush=True)
    exit_on_failures(record, study)


if __name__ == "__main__":
    main()
