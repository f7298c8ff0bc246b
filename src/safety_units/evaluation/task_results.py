"""Task results and prompt selection, shared by every evaluation task (refusal, multiple choice, perplexity,
re-judging): the TaskResult record, the stable-hash `limit`, and the refusal task's result from judge verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from safety_units.utils.errors import ConfigError
from safety_units.data.sources import stable_fraction
from safety_units.utils.stats import pairwise_kappa, prompt_list_hash, wilson


@dataclass
class TaskResult:
    task: str
    metric: str
    value: float
    n: int
    ci_low: float
    ci_high: float
    extra: dict = field(default_factory=dict)

    def row(self) -> str:
        return (f"| {self.task} | {self.metric} | {self.value:.4f} | [{self.ci_low:.4f}, {self.ci_high:.4f}] | "
                f"{self.n} |")


def markdown_table(results: dict[str, TaskResult]) -> str:
    lines = ["| task | metric | value | 95% CI | n |", "|---|---|---:|---|---:|"]
    lines += [r.row() for r in results.values()]
    return "\n".join(lines)


def task_limit(task: DictConfig, settings: DictConfig) -> int | None:
    """The smaller of the task's own cap and the suite-wide eval.limit (either may be null)."""
    caps = [int(x) for x in (task.get("limit"), settings.get("limit")) if x]
    return min(caps) if caps else None


def select_by_hash(items: list, limit: int | None, key: str, text=lambda x: x) -> list:
    """At most `limit` items: those with the smallest stable hash of (key, normalised text), in file order.

    An item's rank depends on its own text only, so a limit picks the same prompts whatever the model and whatever
    else was removed (a seeded random draw would shift with every removal)."""
    if not limit or len(items) <= limit:
        return items
    rank = sorted(range(len(items)), key=lambda i: (stable_fraction(f"{key} {text(items[i])}"), i))
    return [items[i] for i in sorted(rank[:limit])]


def judge_name(judge) -> str:
    """How reports name a judge: its `name` attribute if it has one, else its class name."""
    return str(getattr(judge, "name", None) or type(judge).__name__)


def judge_agreement(verdicts: list) -> dict:
    """Per-judge refusal rates and pairwise Cohen's kappa, when the judge is an ensemble (verdicts carry votes)."""
    if not verdicts or verdicts[0].votes is None:
        return {}
    votes = {k: [v.votes[k] for v in verdicts] for k in verdicts[0].votes}
    kappa = {pair: round(k, 4) for pair, k in pairwise_kappa(votes).items()}
    return {"judge_refusal_rates": {k: sum(v) / len(v) for k, v in votes.items()}, "judge_kappa": kappa}


def refusal_result(name: str, report: str, prompts: list[str], completions: list[str], verdicts: list, judge,
                   extra: dict) -> tuple[TaskResult, list[dict]]:
    """The task result (metric, Wilson interval, prompt hash, per-prompt outcomes) and one row per completion."""
    if report not in ("asr", "refusal_rate"):
        raise ConfigError(f"eval.tasks.{name}.report must be asr or refusal_rate, got {report!r}.")
    n = len(verdicts)
    refused = sum(v.refusal for v in verdicts)
    success = sum(v.attack_success() for v in verdicts)
    k = success if report == "asr" else refused
    outcomes = [int(v.attack_success() if report == "asr" else v.refusal) for v in verdicts]
    result = TaskResult(name, report, k / n, n, *wilson(k, n), {
        "refusals": refused, "attack_successes": success, "short": sum(v.short for v in verdicts), **extra,
        "judge": judge_name(judge), **judge_agreement(verdicts), "prompt_hash": prompt_list_hash(prompts),
        "outcomes": outcomes})
    rows = []
    for p, c, v in zip(prompts, completions, verdicts):
        rows.append({"task": name, "prompt": p, "completion": c, "refusal": bool(v.refusal), "short": bool(v.short),
                     "reason": v.reason, **({"votes": v.votes} if v.votes is not None else {})})
    return result, rows
