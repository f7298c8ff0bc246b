"""A sweep's runs table without a server: one row per job of a multirun (or any folder of run dirs), one column per
swept key and per metric, read from the jobs' own files -- what a wandb dashboard's runs table shows, offline.

Per job: `.hydra/overrides.yaml` (which keys the sweep set), `params.json` (the flat resolved config,
safety_units.utils.run_logging), `summary.json` (the run summary: eval before / after / change / p, frozen delta, time),
else `eval.json` and `model/freeze_check.json`. The swept keys are the override keys whose values differ between
jobs; without Hydra's files, the params that differ (run dirs and names aside).

    python -m safety_units.runs <multirun dir> [--out runs.md] [--csv runs.csv] [--metrics REGEX]
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from omegaconf import OmegaConf

from safety_units.utils.errors import ConfigError

# params that differ between any two runs without being a setting (where each job writes, how it is named)
PER_RUN = re.compile(r"^(paths\.|run_name$|git\.|hydra\.|.*\.(output_dir|save_dir|dirpath)$)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}).") from None


def overrides(job: Path) -> dict[str, str]:
    """key -> value of the job's Hydra overrides (`seed=1`, `+x=y`); deletions (`~key`) are left out."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out = {}
    for item in OmegaConf.load(path) or []:
        key, sep, value = str(item).partition("=")
        if sep and not key.startswith("~"):
            out[key.lstrip("+")] = value
    return out


def metrics(job: Path) -> dict:
    """The job's run summary; for runs without one, its eval.json values and frozen-entry check."""
    summary = _read_json(job / "summary.json")
    if summary:
        return summary
    out = {f"eval/{k.split('/')[0]}/{r['metric']}": r.get("value") for k, r in _read_json(job / "eval.json").items()
           if isinstance(r, dict) and "metric" in r}
    check = _read_json(job / "model" / "freeze_check.json")
    if "frozen_max_abs_delta" in check:
        out["freeze/frozen_max_abs_delta"] = check["frozen_max_abs_delta"]
    return out


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("params.json", "summary.json", "eval.json",
                                                             ".hydra/overrides.yaml"))


def find_jobs(root: str | Path) -> list[Path]:
    """The run dirs under `root` (a multirun dir's numbered jobs first, in number order), or root itself."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory: pass a multirun dir (logs/<task>/multiruns/<time>) or a "
                          f"folder of run dirs.")
    jobs = [p for p in root.iterdir() if is_run(p)]
    if not jobs and is_run(root):
        jobs = [root]
    if not jobs:
        raise ConfigError(f"{root}: no run dirs here (none has params.json, summary.json, eval.json or "
                          f".hydra/overrides.yaml).")
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def _differ(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [k for k in keys if len({json.dumps(r.get(k), sort_keys=True, default=str) for r in rows}) > 1]


def runs_table(root: str | Path, metric_filter: str | None = None) -> dict:
    """{"jobs": [names], "varied": [swept keys], "metrics": [metric names], "rows": [[job, *values]]}."""
    jobs = find_jobs(root)
    over = [overrides(j) for j in jobs]
    params = [_read_json(j / "params.json") for j in jobs]
    if any(over):
        varied = _differ(over)
        values = [{**p, **o} for p, o in zip(params, over)]  # the override as typed, else the resolved value
    else:
        varied = [k for k in _differ(params) if not PER_RUN.match(k)]
        values = params
    found = [metrics(j) for j in jobs]
    names = sorted({k for m in found for k in m})
    if metric_filter:
        names = [k for k in names if re.search(metric_filter, k)]
    rows = [[j.name, *(v.get(k) for k in varied), *(m.get(k) for k in names)]
            for j, v, m in zip(jobs, values, found)]
    return {"jobs": [j.name for j in jobs], "varied": varied, "metrics": names, "rows": rows}


def _cell(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def markdown(table: dict) -> str:
    head = ["job", *table["varied"], *table["metrics"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(x) for x in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def write_csv(table: dict, path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", *table["varied"], *table["metrics"]])
        w.writerows(table["rows"])
