"""What a run tells its loggers (wandb, CSV), so that a sweep is a dashboard: the resolved config and the run's
facts once, a summary at the end, the completions behind each refusal rate, and the plots it writes anyway.

* params: the resolved config as flat dotted keys (`freeze.strategy`, `optim.lr`, `seed`, `model.path`), plus the
  unit map's fingerprint and class shares, frozen vs trainable entries, the LoRA rank and the code's git commit.
  Every logger gets them once (`log_hyperparams`: wandb's config, the CSV logger's hparams.yaml), and the run dir
  gets `params.json` (evaluate.py also puts them into eval_meta.json), so wandb-less users have them too.
* summary: each before/after metric, its change and paired p, `frozen_max_abs_delta`, wall time and tokens/s --
  wandb's run summary (the runs table shows it without opening a run), a last row for other loggers, and
  `summary.json` in the run dir. `python -m safety_units.runs <multirun dir>` tabulates these files offline.
* completions: one wandb table per refusal task (prompt, completion, each judge's vote, verdict; before and after
  side by side), at most `eval.log_completions` rows picked by the same stable hash as `eval.limit`.
* images: the PNGs the run writes (units per layer, drift) go to wandb as they are; plotting stays file-first.

Loggers other than wandb get params and summary; tables and images are wandb's. Callers run these on rank zero.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safety_units.compare import PromptMismatchError, paired_difference
from safety_units.config import wandb_loggers
from safety_units.models import fingerprint_key
from safety_units.sources import read_rows
from safety_units.task_results import select_by_hash


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


def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def eval_summary(results: dict[str, dict], prefix: str = "eval") -> dict:
    """`<prefix>/<task>/<metric>` of one evaluation's eval.json results."""
    return {f"{prefix}/{k.split('/')[0]}/{r['metric']}": _finite(r["value"]) for k, r in results.items()}


def change_summary(before: dict[str, dict], after: dict[str, dict]) -> dict:
    """Per task: before, after, change (after - before) and the paired p (McNemar; None for perplexity)."""
    out = {}
    for k, b in before.items():
        a = after.get(k)
        if a is None:
            continue
        key = f"eval/{k.split('/')[0]}/{b['metric']}"
        out.update({f"{key}/before": _finite(b["value"]), f"{key}/after": _finite(a["value"])})
        try:
            d = paired_difference(b, a, k)
        except PromptMismatchError:  # no paired change for evaluations of different prompts
            continue
        out.update({f"{key}/change": _finite(d["diff"]), f"{key}/p": d["p_mcnemar"]})
    return out


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


def read_generations(path: str | Path) -> list[dict]:
    """The rows of a generations*.jsonl ([] when the evaluation wrote none)."""
    return read_rows(path, "jsonl") if Path(path).is_file() else []


def completion_tables(rows_by_when: dict[str, list[dict]], cap: int, seed: int = 0) -> dict[str, tuple]:
    """{task: (columns, data)}: one row per prompt, each evaluation's completion, votes and verdict side by side;
    at most `cap` prompts per task, those with the smallest stable hash of (seed, task, prompt), as eval.limit."""
    tables = {}
    whens = list(rows_by_when)
    tasks = list(dict.fromkeys(r["task"] for rows in rows_by_when.values() for r in rows))
    for task in tasks:
        by_when = {w: {r["prompt"]: r for r in rows_by_when[w] if r["task"] == task} for w in whens}
        prompts = list(dict.fromkeys(p for w in whens for p in by_when[w]))
        prompts = select_by_hash(prompts, cap, f"{seed} {task}")
        judges = sorted({j for w in whens for r in by_when[w].values() for j in (r.get("votes") or {})})
        columns = ["prompt"]
        for w in whens:
            columns += [f"{w} completion", *(f"{w} {j}" for j in judges), f"{w} refusal", f"{w} reason"]
        data = []
        for p in prompts:
            row = [p]
            for w in whens:
                r = by_when[w].get(p, {})
                votes = r.get("votes") or {}
                row += [r.get("completion"), *(votes.get(j) for j in judges), r.get("refusal"), r.get("reason")]
            data.append(row)
        tables[task] = (columns, data)
    return tables


def log_completions(loggers, rows_by_when: dict[str, list[dict]], cap: int, seed: int = 0, step: int = 0) -> int:
    """A wandb table `completions/<task>` per refusal task; returns the number of tables logged."""
    targets = wandb_loggers(loggers)
    if not targets or not cap or cap <= 0:
        return 0
    tables = completion_tables(rows_by_when, int(cap), seed)
    for lg in targets:
        for task, (columns, data) in tables.items():
            lg.log_table(f"completions/{task}", columns=columns, data=data, step=step)
    return len(tables)


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
