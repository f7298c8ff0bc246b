"""What a run tells its loggers (wandb, CSV), so that a sweep is a dashboard: the resolved config and the run's
facts once, a summary at the end, the completions behind each refusal rate, and the plots it writes anyway.

* params: the resolved config as flat dotted keys (`freeze.strategy`, `optim.lr`, `seed`, `model.path`), plus the
  unit map's fingerprint and class shares, frozen vs trainable entries, the LoRA rank and the code's git commit.
  Every logger gets them once (`log_hyperparams`: wandb's config, the CSV logger's hparams.yaml), and the run dir
  gets `params.json` (evaluate.py also puts them into eval_meta.json), so wandb-less users have them too.
* summary: each before/after metric, its change and paired p, `frozen_max_abs_delta`, wall time and tokens/s --
  wandb's run summary (the runs table shows it without opening a run), a last row for other loggers, and
  `summary.json` in the run dir. `python -m safety_units.runs <multirun dir>` tabulates these files offline.
* completions: one wandb table per refusal task, before and after side by side (`evaluation.run_tables`, with the
  before/after summaries, since they read evaluation results).
* images: the PNGs the run writes (units per layer, drift) go to wandb as they are; plotting stays file-first.

Loggers other than wandb get params and summary; tables and images are wandb's. Callers run these on rank zero.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safety_units.utils.config import wandb_loggers
from safety_units.utils.fingerprints import fingerprint_key


def flat(tree, prefix: str = "") -> dict:
    """Nested dicts as one dict with dotted keys; lists and scalars are kept as values."""
    out = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def git_state(root: str | Path) -> dict:
    """The code's commit and whether the working tree differs from it (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git.commit": commit, "git.dirty": None if status is None else bool(status)}


def run_params(cfg: DictConfig, unit_map=None, freeze: dict | None = None, adapter: dict | None = None) -> dict:
    """The flat dictionary every logger and params.json get (see the module docstring)."""
    params = flat(OmegaConf.to_container(cfg, resolve=True))
    params.update(git_state(cfg.paths.root_dir))
    if unit_map is not None:
        params["unit_map.path"] = str(unit_map.path)
        params["unit_map.fingerprint"] = fingerprint_key(unit_map.metadata.get("fingerprint", {}))
        for kind, shares in unit_map.summary()["total"].items():
            params.update({f"unit_map.share.{kind}.{c}": s["share"] for c, s in shares.items() if isinstance(s, dict)})
    if freeze is not None and freeze.get("entries"):
        e = freeze["entries"]
        params.update({"freeze.entries_frozen": e["frozen"], "freeze.entries_trainable": e["trainable"],
                       "freeze.frozen_share": e["frozen_share"]})
    if adapter is not None:
        params["adapter.lora_rank"] = adapter.get("rank")
    return params


def log_params(loggers, params: dict, out_dir: str | Path | None = None) -> None:
    for lg in loggers or []:
        lg.log_hyperparams(params)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "params.json").write_text(json.dumps(params, indent=1, default=str) + "\n")


def set_summary(loggers, summary: dict, out_dir: str | Path | None = None, step: int | None = None) -> None:
    """wandb's run summary; a last metrics row for other loggers (numbers only); summary.json in out_dir."""
    numbers = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    wandb = wandb_loggers(loggers)
    for lg in loggers or []:
        if lg in wandb:
            lg.experiment.summary.update(summary)
        elif numbers:
            lg.log_metrics(numbers, step=step or 0)
            lg.save()
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")


def log_images(loggers, images: dict[str, str | Path], step: int | None = None) -> int:
    """The run's PNGs, as written, to wandb (key -> file); missing files are skipped. Returns how many."""
    found = {k: str(p) for k, p in images.items() if p and Path(p).is_file()}
    for lg in wandb_loggers(loggers):
        for key, path in found.items():
            lg.log_image(key, images=[path], step=step)
    return len(found) if wandb_loggers(loggers) else 0


class Stopwatch:
    """Seconds this process spent in the logging of this module's callers (params, summary, tables, plots, closing
    the loggers); benchmarks/logging_overhead.py reads `total`, and `depth` tells it when a call is inside one."""

    total = 0.0
    depth = 0

    def __enter__(self):
        Stopwatch.depth += 1
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        Stopwatch.depth -= 1
        if Stopwatch.depth == 0:
            Stopwatch.total += time.perf_counter() - self.t0
        return False
