"""The defense benchmark v2: which defense to use when fine-tuning an aligned model on data you don't fully trust --
every defense tuned on validation data, attacked by a tuned attacker, over alignment seeds.

    python scripts/run_defenses.py --scale cpu              # 2 CPU cores, 2 one-thread workers, resumable
    python scripts/run_defenses.py --scale cpu --resume     # keep finished stages whose config is unchanged
    python scripts/run_defenses.py --list                   # the stages plannable now, in run order
    python scripts/run_defenses.py --only '_proto_' --resume
    python scripts/run_defenses.py --report-only            # rebuild results/defenses.md from the artifacts

Phases (safety_units.experiments.defense_bench.plan): tune every defense over its grid (seed 0, the protocol
attack), choose each setting (criteria.choose_setting, validation data only), attack each chosen setting with the
scale's attack grid, choose each defense's worst attack (criteria.worst_attack), then run the other alignment seeds
at the protocol and the worst attack. This script runs a phase, writes <bench>/selection.json and runs the next,
until the plan stops growing; each pass resumes the last. The runner is the study's
(safety_units.experiments.study.runner): --resume by config hash, --budget-minutes, --workers.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.experiments.defense_bench.plan import BENCH_NAME, SCALES, advance, plan  # noqa: E402
from safety_units.utils.errors import friendly_errors  # noqa: E402
from safety_units.experiments.study.cli import exit_on_failures, harm_judge, list_stages, run_stages, runner_parser  # noqa: E402

RESULTS = ROOT / "results"
MAX_PASSES = 4  # tune, attack, test (+ one that finds nothing new)


@friendly_errors
def main(argv: list[str] | None = None):
    ap = runner_parser(__doc__, SCALES, "--bench-dir", ROOT / "logs" / BENCH_NAME, RESULTS, "defenses")
    ap.add_argument("--no-collect", action="store_true",
                    help="build the report from <results dir>/<name>/cells.json only (no re-judging)")
    args = ap.parse_args(argv)
    scale, bench = SCALES[args.scale], args.run_dir.resolve()
    if args.list:
        return list_stages(plan(scale, str(bench)), width=48)
    record, judge = {}, None
    if not args.report_only:
        for n in range(MAX_PASSES):
            record = run_stages(args, scale, bench, f"benchmark pass {n + 1}", plan_fn=plan)
            args.resume = True  # the next pass keeps this one's stages
            judge = judge or harm_judge(args.extra)
            if args.only or not advance(bench, scale, judge):
                break
    if not args.no_report:
        from safety_units.experiments.defense_bench.report import collect, write_report

        if (bench / "study.json").is_file() and not args.no_collect:  # else: rebuild from the shipped cells.json
            judge_report = args.results_dir / "harm_judge.json"  # the HS judge's validation: corrected HS
            print(f"collected {collect(bench, scale, args.results_dir / args.report_name, judge or harm_judge(args.extra), judge_report)}",
                  flush=True)
        print(f"wrote {write_report(args.results_dir, args.report_name)}", flush=True)
    exit_on_failures(record, bench)


if __name__ == "__main__":
    main()
