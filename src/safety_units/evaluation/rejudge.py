"""Re-judge saved completions without loading a model (HarmBench-style): compare judges, re-score old runs.

    python evaluate.py eval=rejudge eval.tasks.rejudge.source.path=run/generations.jsonl \
        eval.tasks.rejudge.source.prompt=prompt eval.tasks.rejudge.source.completion=completion judge=ensemble

Reads a CSV / JSON / JSONL file (a `where` filter selects rows, e.g. {task: harmful} in a generations.jsonl),
judges every completion, and returns the rows in input order, each with a boolean `refusal`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from safety_units.data.sources import read_rows, row_matches
from safety_units.utils.errors import ConfigError, DataError
from safety_units.evaluation.task_results import refusal_result

REJUDGE_KEYS = ("path", "prompt", "completion", "format", "records", "where")


def load_completions(source: dict, task: str) -> tuple[list[str], list[str], list[dict]]:
    """(prompts, completions, original rows) of a saved-completions file, in file order."""
    unknown = sorted(set(source) - set(REJUDGE_KEYS))
    if unknown:
        raise ConfigError(f"eval.tasks.{task}.source: unknown key(s) {unknown}; valid keys: {list(REJUDGE_KEYS)}.")
    path = source.get("path")
    if not path:
        raise ConfigError(f"eval.tasks.{task}.source.path is not set: give the file of saved completions "
                          f"(eval.tasks.{task}.source.path=<file.jsonl|csv>).")
    if not Path(path).is_file():
        raise ConfigError(f"eval.tasks.{task}.source.path={path!r}: no such file.")
    prompt_key, completion_key = source.get("prompt") or "prompt", source.get("completion") or "completion"
    rows = read_rows(path, source.get("format") or "auto", source.get("records"))
    prompts, completions, kept = [], [], []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is not a record with fields (got {type(row).__name__}).")
        if source.get("where") and not row_matches(row, source["where"]):
            continue
        for key in (prompt_key, completion_key):
            if key not in row:
                raise DataError(f"{path}: row {i} has no field {key!r} (fields: {sorted(row)}); set "
                                f"eval.tasks.{task}.source.{'prompt' if key == prompt_key else 'completion'}=<field>.")
        prompt, completion = row[prompt_key], row[completion_key]
        if completion is None:
            completion = ""
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{path}: row {i}: fields {prompt_key!r} and {completion_key!r} must be text.")
        prompts.append(prompt)
        completions.append(completion)
        kept.append(row)
    if not kept:
        raise DataError(f"{path}: no rows to judge (where={source.get('where')}).")
    return prompts, completions, kept


def rejudge_results(results: dict, rows: list[dict], judge) -> dict:
    """An eval.json's results with every refusal task re-judged from its saved generations (other tasks as they
    were): re-scores a finished run with another judge, keeping its prompts, order and prompt hashes."""
    out = dict(results)
    for name, res in results.items():
        if res.get("metric") not in ("asr", "refusal_rate") or "attack_successes" not in (res.get("extra") or {}):
            continue
        task_rows = [r for r in rows if r.get("task") == name]
        if len(task_rows) != res["n"]:
            raise DataError(f"task {name}: the generations hold {len(task_rows)} rows, its result n={res['n']}; "
                            "pass the generations file written with this eval.json.")
        prompts, completions = [r["prompt"] for r in task_rows], [r["completion"] for r in task_rows]
        keep = {k: v for k, v in res["extra"].items() if k in ("overlaps_removed", "train_overlap", "source",
                                                               "system", "template")}
        new, _ = refusal_result(name, res["metric"], prompts, completions, judge.judge(prompts, completions), judge,
                                keep)
        if res["extra"].get("prompt_hash") not in (None, new.extra["prompt_hash"]):
            raise DataError(f"task {name}: the generations' prompts do not hash to the result's prompt_hash.")
        out[name] = asdict(new)
    return out
