"""The defense benchmark: which defense to use when fine-tuning an aligned model on data you don't fully trust.

    python scripts/run_defenses.py --scale cpu              # 2 CPU cores, 2 one-thread workers, resumable
    python scripts/run_defenses.py --scale cpu --resume     # keep finished stages whose config is unchanged
    python scripts/run_defenses.py --list                   # the stages, in run order
    python scripts/run_defenses.py --only '_mix10_' --resume
    python scripts/run_defenses.py --report-only            # rebuild results/defenses.md from the artifacts

Stages (safety_units.experiments.defense_bench.plan): align the shipped SmolLM2 with SFT, Vaccine and Booster; attribute the
SFT-aligned model (wifv for ESU / ESU+CU / random / layers, the learned mask for `mask_esu_cu`); re-align its ESU
(SN-Tune style); then fine-tune under each threat model (SST-2 with a share p of BeaverTails harmful pairs; Qi et
al.'s harmful examples) with every defense x seeds, each evaluated in memory (eval=defense: harmful prompts from
BeaverTails' held-out half, SST-2 accuracy, OKTest, perplexity). The runner is the study's
(safety_units.experiments.study.runner): --resume by config hash, --budget-minutes, --workers.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.experiments.defense_bench.plan import BENCH_NAME, SCALES, plan  # noqa: E402
from safety_units.utils.errors import friendly_errors  # noqa: E402
from safety_units.experiments.study.cli import exit_on_failures, harm_judge, list_stages, run_stages, runner_parser  # noqa: E402

RESULTS = ROOT / "results"


@friendly_errors
def main(argv: list[str] | None = None):
    ap = runner_parser(__doc__, SCALES, "--bench-dir", ROOT / "logs" / BENCH_NAME, RESULTS, "defenses")
    ap.add_argument("--no-collect", action="store_true",
                    help="build the report from <results dir>/<name>/cells.json only (no re-judging)")
    args = ap.parse_args(argv)
    scale, bench = SCALES[args.scale], args.run_dir.resolve()
    if args.list:
        return list_stages(plan(scale, str(bench)))
    record = {} if args.report_only else run_stages(args, scale, bench, "benchmark", plan_fn=plan)
    if not args.no_report:
        from safety_units.experiments.defense_bench.report import collect, write_report

        if (bench / "study.json").is_file() and not args.no_collect:  # else: rebuild from the shipped cells.json
            judge_report = args.results_dir / "harm_judge.json"  # the HS judge's validation: corrected HS
            print(f"collected {collect(bench, args.results_dir / args.report_name, harm_judge(args.extra), judge_report)}",
                  flush=True)
        print(f"wrote {write_report(args.results_dir, args.report_name)}", flush=True)
    exit_on_failures(record, bench)


if __name__ == "__main__":
    main()
