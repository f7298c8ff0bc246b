"""What a run's logging costs, as a share of its wall time, measured in one run (goal: < 2% of a quickstart).

    python benchmarks/logging_overhead.py                                  # the quickstart (minutes on CPU)
    python benchmarks/logging_overhead.py --json out.json -- trainer.max_steps=5   # any train.py overrides

Runs `python train.py` in this process with logger=wandb (offline) and times, in the same run: wandb's start
(`wandb.init`), the logging calls of safety_units.utils.run_logging's callers (params and plots at the start, the
completions tables, the summary, closing the logger: `Stopwatch.total`), and every other metrics call the trainer
makes to wandb (Lightning's per-step `log_metrics`, the eval and drift metrics).
Prints both and their share of the wall time of the whole run (model load, attribution, training, evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "logs" / "benchmarks" / "logging_overhead"), help="the run dir")
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = ap.parse_args(argv)

    from lightning.pytorch.loggers import WandbLogger

    from safety_units.utils.config import compose_config
    from safety_units.utils.run_logging import Stopwatch
    from safety_units.training.fit import run_train

    other = {"seconds": 0.0, "calls": 0}
    plain = WandbLogger.log_metrics

    def timed_log_metrics(self, metrics, step=None):  # the trainer's own calls, outside run_logging's
        if Stopwatch.depth:
            return plain(self, metrics, step)
        t0 = time.perf_counter()
        try:
            return plain(self, metrics, step)
        finally:
            other["seconds"] += time.perf_counter() - t0
            other["calls"] += 1

    WandbLogger.log_metrics = timed_log_metrics
    import wandb

    start = {"seconds": 0.0}
    plain_init = wandb.init

    def timed_init(*a, **kw):  # wandb's start, wherever the trainer first touches the logger
        t0 = time.perf_counter()
        try:
            return plain_init(*a, **kw)
        finally:
            if not Stopwatch.depth:
                start["seconds"] += time.perf_counter() - t0

    wandb.init = timed_init
    cfg = compose_config("train", ["logger=wandb", *args.overrides])
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = args.out
    t0 = time.perf_counter()
    summary = run_train(cfg)
    wall = time.perf_counter() - t0
    result = {"overrides": args.overrides, "wall_s": round(wall, 2), "global_step": summary["global_step"],
              "run_logging_s": round(Stopwatch.total, 3), "trainer_log_metrics_s": round(other["seconds"], 3),
              "trainer_log_metrics_calls": other["calls"], "wandb_init_s": round(start["seconds"], 3)}
    result["logging_share"] = round((Stopwatch.total + other["seconds"] + start["seconds"]) / wall, 5)
    print(f"wall {wall:.1f} s; run_logging {Stopwatch.total:.2f} s, wandb.init {start['seconds']:.2f} s, trainer "
          f"log_metrics {other['seconds']:.2f} s ({other['calls']} calls): logging = "
          f"{100 * result['logging_share']:.2f}% of the run (goal < 2%)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
