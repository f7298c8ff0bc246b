"""What a run's logging costs, as a share of its wall time, measured in one run (goal: < 2% of a quickstart;
benchmarks/logging_overhead.py is the command line).

Runs `python train.py` in this process with logger=wandb (offline) and times, in the same run: wandb's start
(`wandb.init`), the logging calls of safety_units.utils.run_logging's callers (params and plots at the start, the
completions tables, the summary, closing the logger: `Stopwatch.total`), and every other metrics call the trainer
makes to wandb (Lightning's per-step `log_metrics`, the eval and drift metrics). `measure` returns both and their
share of the wall time of the whole run (model load, attribution, training, evaluation).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from omegaconf import open_dict

from safety_units.training.fit import run_train
from safety_units.utils.config import compose_config
from safety_units.utils.run_logging import Stopwatch


@contextlib.contextmanager
def timed_wandb():
    """Time wandb's start and the trainer's own log_metrics calls (those outside run_logging's Stopwatch) while
    inside; yields {"init_s", "log_metrics_s", "log_metrics_calls"}, filled as they happen."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    timing = {"init_s": 0.0, "log_metrics_s": 0.0, "log_metrics_calls": 0}
    plain_log, plain_init = WandbLogger.log_metrics, wandb.init

    def timed_log_metrics(self, metrics, step=None):  # the trainer's own calls, outside run_logging's
        if Stopwatch.depth:
            return plain_log(self, metrics, step)
        t0 = time.perf_counter()
        try:
            return plain_log(self, metrics, step)
        finally:
            timing["log_metrics_s"] += time.perf_counter() - t0
            timing["log_metrics_calls"] += 1

    def timed_init(*a, **kw):  # wandb's start, wherever the trainer first touches the logger
        t0 = time.perf_counter()
        try:
            return plain_init(*a, **kw)
        finally:
            if not Stopwatch.depth:
                timing["init_s"] += time.perf_counter() - t0

    WandbLogger.log_metrics, wandb.init = timed_log_metrics, timed_init
    try:
        yield timing
    finally:
        WandbLogger.log_metrics, wandb.init = plain_log, plain_init


def measure(overrides: list[str], out_dir: Path) -> dict:
    """One train.py run (logger=wandb, offline) into out_dir: its wall time and what its logging took."""
    with timed_wandb() as timing:
        cfg = compose_config("train", ["logger=wandb", *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
        t0 = time.perf_counter()
        summary = run_train(cfg)
        wall = time.perf_counter() - t0
    result = {"overrides": overrides, "wall_s": round(wall, 2), "global_step": summary["global_step"],
              "run_logging_s": round(Stopwatch.total, 3), "trainer_log_metrics_s": round(timing["log_metrics_s"], 3),
              "trainer_log_metrics_calls": timing["log_metrics_calls"], "wandb_init_s": round(timing["init_s"], 3)}
    result["logging_share"] = round((Stopwatch.total + timing["log_metrics_s"] + timing["init_s"]) / wall, 5)
    return result


def summary_line(r: dict) -> str:
    return (f"wall {r['wall_s']:.1f} s; run_logging {r['run_logging_s']:.2f} s, wandb.init {r['wandb_init_s']:.2f} s, "
            f"trainer log_metrics {r['trainer_log_metrics_s']:.2f} s ({r['trainer_log_metrics_calls']} calls): "
            f"logging = {100 * r['logging_share']:.2f}% of the run (goal < 2%)")
