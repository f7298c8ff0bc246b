"""The Superficial Safety Alignment Hypothesis study (v2) on SmolLM2-135M-Instruct, end to end.

    python scripts/run_study.py --scale gpu                 # one GPU, bf16-mixed, 3 worker processes
    python scripts/run_study.py --scale cpu --resume        # 2 CPU cores, reduced sizes, 2 one-thread workers
    python scripts/run_study.py --scale cpu --workers 1     # everything in this process
    python scripts/run_study.py --list                      # the stages, in run order
    python scripts/run_study.py --only '^c_alpaca_' --resume  # some stages (a regular expression on names)
    python scripts/run_study.py --report-only               # rebuild results/ssah_smollm2.md from the artifacts

Stages (safety_units.study.plan): attribute the shipped model (the RU budget of claim a); align it (--scale
gpu: 2,000 refusal pairs + 2,000 benign instructions; cpu: 480 examples) -> the aligned model; attribute that
(ESU / EUU / CU / RU); (b) ablate each class and size-matched random sets; (a) full vs RU-only vs random-budget
alignment x learning rates x seeds; (c) fine-tune the aligned model under each threat model (Alpaca, Dolly,
harmful mixtures p, AOA epochs) with freeze = none / esu / esu_cu / random 7.5% / layers, x seeds. Every trained
model is evaluated in memory (ASR, OKTest over-refusal, held-out perplexity of the fine-tune's task);
safety_units.study.report writes the report from the artifacts only, with the criteria of
safety_units.study.verdicts.

Each finished stage leaves <study>/<stage>.stage.json with its config hash and seconds: --resume skips a stage only
when its output exists and the hash matches. --budget-minutes stops starting stages after that long (the rest: "not
run"). After the setup stages, --workers processes take the other stages from a queue (the scale's default: 2 on
CPU, one thread each).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.errors import friendly_errors
from safety_units.study.plan import SCALES, STUDY_NAME, plan

RESULTS = ROOT / "results"
V1_REPORT = RESULTS / "ssah_smollm2_v1.md"


@friendly_errors
def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--study-dir", type=Path, default=ROOT / "logs" / STUDY_NAME)
    ap.add_argument("--resume", action="store_true",
                    help="skip stages whose outputs exist and whose config hash is unchanged (rerun the others)")
    ap.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    ap.add_argument("--only", help="run only the stages whose name matches this regular expression")
    ap.add_argument("--budget-minutes", type=float, help="start no stage after this many minutes")
    ap.add_argument("--workers", type=int,
                    help="processes running the stages after the setup (default: the scale's, cpu 2 / gpu "
                         f"{SCALES['gpu'].workers}); the CPU cores are split between them")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every stage's configs (e.g. paths.data_dir=/data); repeatable")
    ap.add_argument("--list", action="store_true", help="print the stages and exit")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from the artifacts")
    ap.add_argument("--no-report", action="store_true", help="run the stages, write no report")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--report-name", default="ssah_smollm2",
                    help="the report is <results dir>/<name>.md with plots and summary.json in <results dir>/<name>/")
    args = ap.parse_args(argv)
    scale, study = SCALES[args.scale], args.study_dir.resolve()
    if args.list:
        for s in plan(scale, str(study)):
            print(f"{s.name:32s} {s.kind:10s} from {s.model}")
        return
    if not args.report_only:
        import torch

        from safety_units.study.runner import run_study

        torch.set_float32_matmul_precision("high")  # TF32 matmuls for the fp32 parts on a GPU
        t0 = time.time()
        workers = scale.workers if args.workers is None else args.workers
        record = run_study(scale, study, args.extra, args.only, args.resume, args.force, args.budget_minutes, workers)
        print(f"study: {len(record['ran'])} ran, {len(record['skipped'])} skipped, {len(record['not_run'])} not "
              f"run, {len(record['failed'])} failed in {(time.time() - t0) / 60:.1f} min", flush=True)
    if not args.no_report:
        from safety_units.study.report import write_report

        print(f"wrote {write_report(study, args.results_dir, V1_REPORT, args.report_name)}", flush=True)
    if not args.report_only and record["failed"]:
        sys.exit(f"{len(record['failed'])} stage(s) failed: {', '.join(record['failed'])}; see their logs in {study}")


if __name__ == "__main__":
    main()
