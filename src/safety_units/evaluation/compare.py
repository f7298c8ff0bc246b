"""Compare evaluations on the same prompts: paired differences and the before/after table.

Each task of an eval.json records `extra.prompt_hash` (the ordered prompts it saw) and `extra.outcomes` (one
value per prompt: 0/1 for rates and accuracy, [nll sum, tokens] for perplexity). Two runs are compared prompt by
prompt -- a paired bootstrap interval for the change and an exact McNemar test for binary metrics -- and only
when their prompt hashes agree; otherwise PromptMismatchError.

    python scripts/compare.py <run dir or eval.json A> <B> [<C> ...] [--out table.md]

compares every later run with the first (the baseline); callbacks=eval (safety_units.training.callbacks.EvalCallback)
writes the before/after table of a training run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path

from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger
from safety_units.utils.stats import mcnemar_exact, paired_bootstrap

log = RankedLogger(__name__)


class PromptMismatchError(ConfigError):
    """Two evaluations of a task did not see the same prompts (or one predates prompt hashes)."""


def _as_dict(result) -> dict:
    return asdict(result) if is_dataclass(result) else result


def _ppl(pairs: list) -> float:
    """Perplexity of a resample of [nll sum, tokens] pairs: pooled over tokens, as the task reports it."""
    return math.exp(sum(p[0] for p in pairs) / max(1, sum(p[1] for p in pairs)))


def paired_difference(a: dict, b: dict, task: str) -> dict:
    """b minus a on the same prompts: {"diff", "ci_low", "ci_high" (paired bootstrap 95%), "p_mcnemar"}.

    a and b are TaskResults as stored in eval.json; p_mcnemar is None for perplexity (not a binary outcome)."""
    a, b = _as_dict(a), _as_dict(b)
    for which, r in (("first", a), ("second", b)):
        extra = r.get("extra") or {}
        if extra.get("prompt_hash") is None or extra.get("outcomes") is None:
            raise PromptMismatchError(
                f"task {task}: the {which} evaluation has no prompt_hash/outcomes (its eval.json predates paired "
                f"comparisons); re-run that evaluation to compare it.")
    ha, hb = a["extra"]["prompt_hash"], b["extra"]["prompt_hash"]
    oa, ob = a["extra"]["outcomes"], b["extra"]["outcomes"]
    if ha != hb or len(oa) != len(ob):
        raise PromptMismatchError(
            f"task {task}: the evaluations saw different prompts (prompt_hash {ha} vs {hb}); paired statistics "
            f"need the same prompts: evaluate both with the same eval config (tasks, limit, seed, dedupe_against).")
    if a["metric"] != b["metric"]:
        raise ConfigError(f"task {task}: cannot compare metric {a['metric']!r} with {b['metric']!r}.")
    if a["metric"] == "ppl":
        diff, lo, hi = paired_bootstrap(oa, ob, statistic=_ppl)
        return {"diff": diff, "ci_low": lo, "ci_high": hi, "p_mcnemar": None}
    diff, lo, hi = paired_bootstrap(oa, ob)
    return {"diff": diff, "ci_low": lo, "ci_high": hi, "p_mcnemar": mcnemar_exact(oa, ob)}


def _judges(results: dict) -> set[str]:
    return {r["extra"]["judge"] for r in results.values() if (r.get("extra") or {}).get("judge")}


def compare_table(before: dict, after: dict, judge: str | None = None,
                  labels: tuple[str, str] = ("before", "after")) -> str:
    """Markdown table of every task in both: values, change (after - before), its paired 95% CI, McNemar p.

    Results are TaskResults or their eval.json dicts; `judge` names the refusal judge (default: as recorded in
    the results). Raises PromptMismatchError, listing every task, when prompt hashes differ."""
    before = {k: _as_dict(v) for k, v in before.items()}
    after = {k: _as_dict(v) for k, v in after.items()}
    rows, errors = [], []
    for k, b in before.items():
        a = after.get(k)
        if a is None:
            continue
        try:
            d = paired_difference(b, a, k)
        except PromptMismatchError as e:
            errors.append(str(e))
            continue
        p = "n/a" if d["p_mcnemar"] is None else f"{d['p_mcnemar']:.3g}"
        rows.append(f"| {b['task']} | {b['metric']} | {b['value']:.4f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}] | "
                    f"{a['value']:.4f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] | {d['diff']:+.4f} | "
                    f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | {p} | {a['n']} |")
    if errors:
        raise PromptMismatchError(" ".join(errors))
    if judge is None:  # as recorded; a re-judged run may name another judge than its baseline
        jb, ja = ", ".join(sorted(_judges(before))) or "none", ", ".join(sorted(_judges(after))) or "none"
        judge = jb if jb == ja else f"{jb} ({labels[0]}), {ja} ({labels[1]})"
    head = (f"Refusal judge: {judge}. Change = {labels[1]} - {labels[0]} on the same prompts; 95% CI: "
            f"paired bootstrap over prompts; p: exact McNemar test (binary outcomes).\n\n"
            f"| task | metric | {labels[0]} | {labels[1]} | change | 95% CI of change | McNemar p | n |\n"
            f"|---|---|---:|---:|---:|---|---:|---:|")
    return "\n".join([head] + rows)


# --------------------------------------------------------------------------- reading runs
def load_eval(path: str | Path) -> dict[str, dict]:
    """The task results of an eval.json, or of <run dir>/eval.json."""
    p = Path(path)
    if p.is_dir():
        if not (p / "eval.json").is_file():
            found = sorted(x.name for x in p.glob("eval*.json"))
            raise ConfigError(f"{p}: no eval.json here" + (f" (found {', '.join(found)}: pass one of them)."
                                                           if found else "; is it an evaluation run dir?"))
        p = p / "eval.json"
    if not p.is_file():
        raise ConfigError(f"{p} does not exist: pass an evaluation run dir or its eval.json.")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON ({e}).") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "metric" in v for v in data.values()):
        raise ConfigError(f"{p} is not an eval.json (a map from task to its result).")
    return data
