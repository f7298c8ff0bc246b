"""The evaluation side of a run's logging (safety_units.evaluation.run_tables): before/after summaries with the
paired change and p, and the completions side by side, capped by the same stable hash as eval.limit."""
import json
import math
from types import SimpleNamespace

from safety_units.evaluation.run_tables import (
    change_summary,
    completion_tables,
    eval_summary,
    log_completions,
    read_generations,
)
from safety_units.evaluation.task_results import select_by_hash


def result(task: str, metric: str, outcomes: list, prompt_hash: str = "x", value: float | None = None) -> dict:
    """A TaskResult as stored in eval.json."""
    if value is None:
        value = sum(outcomes) / len(outcomes) if metric != "ppl" else math.exp(
            sum(o[0] for o in outcomes) / sum(o[1] for o in outcomes))
    return {"task": task, "metric": metric, "value": value, "extra": {"prompt_hash": prompt_hash,
                                                                     "outcomes": outcomes}}


def generations(when: str) -> list[dict]:
    return [{"task": "harmful", "prompt": f"p{i}", "completion": f"{when} {i}", "refusal": i % 2 == 0,
             "reason": "r", "votes": {"patterns": i % 2 == 0, "strings": True}} for i in range(6)]


class WandbLogger:
    """A stand-in told apart by its class name, as utils.config.wandb_loggers does."""

    def __init__(self):
        self.tables = []

    def log_table(self, key, columns, data, step=None):
        self.tables.append((key, columns, data, step))


def test_completion_tables_pair_the_evaluations_and_cap_by_stable_hash():
    """The wandb completions table: one row per prompt, before and after side by side with each judge's vote; a cap
    keeps the prompts with the smallest stable hash, as eval.limit does, so every run shows the same prompts."""
    tables = completion_tables({"before": generations("b"), "after": generations("a")}, cap=3, seed=0)
    columns, data = tables["harmful"]
    assert columns == ["prompt", "before completion", "before patterns", "before strings", "before refusal",
                       "before reason", "after completion", "after patterns", "after strings", "after refusal",
                       "after reason"]
    prompts = [f"p{i}" for i in range(6)]
    assert [r[0] for r in data] == select_by_hash(prompts, 3, "0 harmful")
    row = data[0]
    i = int(row[0][1:])
    assert row[1] == f"b {i}" and row[6] == f"a {i}" and row[4] == (i % 2 == 0)
    # a prompt only one evaluation answered: the same columns, the other's cells empty
    only_after = {"before": [], "after": generations("a")[:1]}
    assert completion_tables(only_after, cap=5)["harmful"] == (columns, [
        ["p0", None, None, None, None, None, "a 0", True, True, True, "r"]])


def test_change_summary_has_the_paired_change_and_p_where_the_prompts_match():
    before = {"harmful": result("harmful", "asr", [1, 1, 0, 0]), "ppl": result("ppl", "ppl", [[4.0, 2], [2.0, 2]]),
              "oktest": result("oktest", "refusal_rate", [1, 0], prompt_hash="old"),
              "gone": result("gone", "asr", [1])}
    after = {"harmful": result("harmful", "asr", [1, 0, 0, 0]), "ppl": result("ppl", "ppl", [[4.0, 2], [2.0, 2]]),
             "oktest": result("oktest", "refusal_rate", [0, 0], prompt_hash="new")}
    s = change_summary(before, after)
    assert s["eval/harmful/asr/before"] == 0.5 and s["eval/harmful/asr/after"] == 0.25
    assert s["eval/harmful/asr/change"] == -0.25 and s["eval/harmful/asr/p"] == 1.0
    assert s["eval/ppl/ppl/change"] == 0.0 and s["eval/ppl/ppl/p"] is None  # perplexity: no McNemar
    # other prompts: before and after, no paired change; a task missing after: nothing
    assert {k for k in s if k.startswith("eval/oktest")} == {"eval/oktest/refusal_rate/before",
                                                             "eval/oktest/refusal_rate/after"}
    assert not any(k.startswith("eval/gone") for k in s)


def test_eval_summary_names_task_and_metric_and_drops_non_finite_values():
    res = {"harmful": result("harmful", "asr", [1, 0]), "ppl": result("ppl", "ppl", [[1.0, 1]], value=math.inf)}
    assert eval_summary(res) == {"eval/harmful/asr": 0.5, "eval/ppl/ppl": None}
    assert eval_summary(res, prefix="eval_after") == {"eval_after/harmful/asr": 0.5, "eval_after/ppl/ppl": None}


def test_completions_go_to_wandb_one_table_per_task(tmp_path):
    path = tmp_path / "generations_eval_after.jsonl"
    rows = generations("a") + [dict(generations("a")[0], task="oktest")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_generations(path) == rows and read_generations(tmp_path / "none.jsonl") == []
    wandb = WandbLogger()
    assert log_completions([SimpleNamespace(), wandb], {"after": rows}, cap=2, step=7) == 2
    assert [(key, len(data), step) for key, _, data, step in wandb.tables] == [("completions/harmful", 2, 7),
                                                                                ("completions/oktest", 1, 7)]
    assert log_completions([wandb], {"after": rows}, cap=0) == 0  # eval.log_completions=0: none
    assert log_completions([SimpleNamespace()], {"after": rows}, cap=2) == 0  # no wandb logger: none
    assert len(wandb.tables) == 2
