"""The evaluation side of a run's logging: before/after summaries with paired p, and the completions behind each
refusal rate as one wandb table per task (at most `eval.log_completions` prompts, picked by the eval.limit hash).
The run-level logging (params, summary, images, timing) lives in `utils.run_logging`."""

from __future__ import annotations

import math
from pathlib import Path

from safety_units.data.sources import read_rows
from safety_units.evaluation.compare import PromptMismatchError, paired_difference
from safety_units.evaluation.task_results import select_by_hash
from safety_units.utils.config import wandb_loggers


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
