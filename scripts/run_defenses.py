"""The defense benchmark: which defense to use when fine-tuning an aligned model on data you don't fully trust.

    python scripts/run_defenses.py --scale cpu              # 2 CPU cores, 2 one-thread workers, resumable
    python scripts/run_defenses.py --scale cpu --resume     # keep finished stages whose config is unchanged
    python scripts/run_defenses.py --list                   # the stages, in run order
    python scripts/run_defenses.py --only '_mix10_' --resume
    python scripts/run_defenses.py --report-only            # rebuild results/defenses.md from the artifacts

Stages (safety_units.defense_bench.plan): align the shipped SmolLM2 with SFT, Vaccine and Booster; attribute the
SFT-aligned model (wifv for ESU / ESU+CU / random / layers, the learned mask for `mask_esu_cu`); re-align its ESU
(SN-Tune style); then fine-tune under each threat model (SST-2 with a share p of BeaverTails harmful pairs; Qi et
al.'s harmful examples) with every defense x seeds, each evaluated in memory (eval=defense: harmful prompts from
BeaverTails' held-out half, SST-2 accuracy, OKTest, perplexity). The runner is the study's
(safety_units.study.runner): --resume by config hash, --budget-minutes, --workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.defense_bench.plan import BENCH_NAME, SCALES, plan  # noqa: E402
from safety_units.errors import friendly_errors  # noqa: E402

RESULTS = ROOT / "results"


def harm_judge(extra: list[str]):
    """The harmfulness judge behind HS (conf/harm_judge/probe.yaml; trained once, cached)."""
    from safety_units.config import compose_config, instantiate

    cfg = compose_config("evaluate", ["+harm_judge=probe", *extra])
    return instantiate(cfg.harm_judge, "harm_judge")


@friendly_errors
def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--bench-dir", type=Path, default=ROOT / "logs" / BENCH_NAME)
    ap.add_argument("--resume", action="store_true", help="skip finished stages whose config hash is unchanged")
    ap.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    ap.add_argument("--only", help="run only the stages whose name matches this regular expression")
    ap.add_argument("--budget-minutes", type=float, help="start no stage after this many minutes")
    ap.add_argument("--workers", type=int, help="processes after the setup stages (default: the scale's)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every stage's configs; repeatable")
    ap.add_argument("--list", action="store_true", help="print the stages and exit")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from the artifacts")
    ap.add_argument("--no-report", action="store_true", help="run the stages, write no report")
    ap.add_argument("--no-collect", action="store_true",
                    help="build the report from <results dir>/<name>/cells.json only (no re-judging)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--report-name", default="defenses")
    args = ap.parse_args(argv)
    scale, bench = SCALES[args.scale], args.bench_dir.resolve()
    if args.list:
        for s in plan(scale, str(bench)):
            print(f"{s.name:36s} {s.kind:10s} from {s.model}")
        return
    record = {"failed": {}}
    if not args.report_only:
        import torch

        from safety_units.study.runner import run_study

        torch.set_float32_matmul_precision("high")
        t0 = time.time()
        workers = scale.workers if args.workers is None else args.workers
        record = run_study(scale, bench, args.extra, args.only, args.resume, args.force, args.budget_minutes,
                           workers, plan_fn=plan)
        print(f"benchmark: {len(record['ran'])} ran, {len(record['skipped'])} skipped, {len(record['not_run'])} "
              f"not run, {len(record['failed'])} failed in {(time.time() - t0) / 60:.1f} min", flush=True)
    if not args.no_report:
        from safety_units.defense_bench.report import collect, write_report

        if (bench / "study.json").is_file() and not args.no_collect:  # else: rebuild from the shipped cells.json
            print(f"collected {collect(bench, args.results_dir / args.report_name, harm_judge(args.extra))}",
                  flush=True)
        print(f"wrote {write_report(args.results_dir, args.report_name)}", flush=True)
    if record["failed"]:
        sys.exit(f"{len(record['failed'])} stage(s) failed: {', '.join(record['failed'])}; see their logs in {bench}")


if __name__ == "__main__":
    main()
