"""The command line shared by the runner's drivers (scripts/run_study.py, scripts/run_defenses.py): the same flags,
the same run, the same one-line record and the same exit on failed stages."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def runner_parser(doc: str, scales: dict, dir_flag: str, default_dir: Path, results: Path,
                  report_name: str) -> argparse.ArgumentParser:
    """--scale, <dir_flag>, --resume, --force, --only, --budget-minutes, --workers, --set, --list, --report-only,
    --no-report, --results-dir, --report-name; a driver adds its own flags to the parser it gets."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(scales), default="cpu")
    ap.add_argument(dir_flag, dest="run_dir", type=Path, default=default_dir, metavar="DIR",
                    help="where the stages write their outputs (one dir per stage)")
    ap.add_argument("--resume", action="store_true",
                    help="skip stages whose outputs exist and whose config hash is unchanged (rerun the others)")
    ap.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    ap.add_argument("--only", help="run only the stages whose name matches this regular expression")
    ap.add_argument("--budget-minutes", type=float, help="start no stage after this many minutes")
    ap.add_argument("--workers", type=int,
                    help="processes running the stages after the setup (default: the scale's); the CPU cores are "
                         "split between them")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every stage's configs (e.g. paths.data_dir=/data); repeatable")
    ap.add_argument("--launcher", choices=["local", "submitit"], default="local",
                    help="local: this machine's process pool (models stay in memory); submitit: one job per stage, "
                         "its inputs as dependencies (docs/cluster.md)")
    ap.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto",
                    help="--launcher submitit: SLURM, local subprocesses, or SLURM where sbatch exists")
    ap.add_argument("--job", dest="job_params", action="append", default=[], metavar="KEY=VALUE",
                    help="--launcher submitit: an executor setting (timeout_min=240, gpus_per_node=1, "
                         "slurm_partition=gpu, slurm_account=...); repeatable")
    ap.add_argument("--list", action="store_true", help="print the stages and exit")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from the artifacts")
    ap.add_argument("--no-report", action="store_true", help="run the stages, write no report")
    ap.add_argument("--results-dir", type=Path, default=results)
    ap.add_argument("--report-name", default=report_name,
                    help="the report is <results dir>/<name>.md with its data in <results dir>/<name>/")
    return ap


def harm_judge(extra: list[str]):
    """The harmfulness judge behind HS (conf/harm_judge/<HS_JUDGE["config"]>.yaml: its head cached by
    scripts/harm_judge_report.py, else trained once)."""
    from safety_units.utils.config import compose_config, instantiate  # here: --list needs no config stack

    from safety_units.experiments.judges.harm_report import HS_JUDGE  # here: as above

    cfg = compose_config("evaluate", [f"+harm_judge={HS_JUDGE['config']}", *extra])
    return instantiate(cfg.harm_judge, "harm_judge")


def judge_harm(run_dir: Path, pattern: str, extra: list[str]) -> int:
    """Write <stage>/harm_judged.json (HS flags of the harmful-prompt completions: the harm probe says harmful and
    the refusal judge saw no refusal) for every stage matching `pattern` that saved generations.jsonl; returns the
    number of stages judged. Cached by the completions, so a rerun judges only new stages."""
    import json
    import re

    from safety_units.experiments.defense_bench.cells import judged  # here: as above

    from safety_units.experiments.judges.harm_report import validation  # here: as above

    judge, n = harm_judge(extra), 0
    val = validation(Path(__file__).resolve().parents[4] / "results" / "harm_judge.json")  # for corrected HS
    for gen in sorted(Path(run_dir).glob("*/generations.jsonl")):
        if not re.search(pattern, gen.parent.name):
            continue
        rows = [json.loads(x) for x in gen.read_text().splitlines() if x.strip()]
        rows = [r for r in rows if r["task"] == "harmful"]
        if rows:
            judged(gen.parent, rows, judge, val)
            n += 1
    return n


def list_stages(stages, width: int = 36) -> None:
    for s in stages:
        print(f"{s.name:{width}s} {s.kind:10s} from {s.model}")


def run_stages(args, scale, run_dir: Path, what: str, plan_fn=None) -> dict:
    """Run the selected stages (run_study with the parsed flags) and print the record's one-line summary."""
    import torch  # here: --list and --report-only need no torch

    from safety_units.experiments.study.runner import run_study  # here: as above

    torch.set_float32_matmul_precision("high")  # TF32 matmuls for the fp32 parts on a GPU
    t0 = time.time()
    workers = scale.workers if args.workers is None else args.workers
    kw = {"plan_fn": plan_fn} if plan_fn is not None else {}
    if args.launcher == "submitit":
        from safety_units.experiments.study.jobs import run_study_jobs  # here: as above

        record = run_study_jobs(scale, run_dir, args.extra, args.only, args.resume, args.force, **kw,
                                cluster=None if args.cluster == "auto" else args.cluster,
                                job_params=job_params(args.job_params))
    else:
        record = run_study(scale, run_dir, args.extra, args.only, args.resume, args.force, args.budget_minutes,
                           workers, **kw)
    print(f"{what}: {len(record['ran'])} ran, {len(record['skipped'])} skipped, {len(record['not_run'])} not "
          f"run, {len(record['failed'])} failed in {(time.time() - t0) / 60:.1f} min", flush=True)
    return record


def job_params(pairs: list[str]) -> dict:
    """--job KEY=VALUE pairs as executor settings (ints where they parse)."""
    from safety_units.utils.errors import ConfigError  # here: --list needs nothing heavy

    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ConfigError(f"--job {p!r}: expected KEY=VALUE (e.g. timeout_min=240).")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def exit_on_failures(record: dict, run_dir: Path) -> None:
    if record.get("failed"):
        sys.exit(f"{len(record['failed'])} stage(s) failed: {', '.join(record['failed'])}; see their logs in "
                 f"{run_dir}")
