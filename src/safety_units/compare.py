"""Compare evaluations on the same prompts: paired differences, the before/after table and training callback.

Each task of an eval.json records `extra.prompt_hash` (the ordered prompts it saw) and `extra.outcomes` (one
value per prompt: 0/1 for rates and accuracy, [nll sum, tokens] for perplexity). Two runs are compared prompt by
prompt -- a paired bootstrap interval for the change and an exact McNemar test for binary metrics -- and only
when their prompt hashes agree; otherwise PromptMismatchError.

    python -m safety_units.compare <run dir or eval.json A> <B> [<C> ...] [--out table.md]

compares every later run with the first (the baseline).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path

import lightning.pytorch as pl

from safety_units.callbacks import weights_sharded
from safety_units.sources import normalize_prompt
from safety_units.errors import ConfigError, friendly_errors
from safety_units.stats import mcnemar_exact, paired_bootstrap

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- before/after training
class EvalCallback(pl.Callback):
    """Runs an eval suite before and after training (on rank 0) and writes eval_compare.md (compare_table).

    Configured by callbacks=eval; the tokenizer comes from the LightningModule (`pl_module.tokenizer`). Both
    evaluations see the same prompts; the run's training prompts are counted (extra.train_overlap), not removed.
    """

    def __init__(self, suite, judge, output_dir: str | Path, before: bool = True, after: bool = True):
        self.suite, self.judge = suite, judge
        self.output_dir = Path(output_dir)
        self.before, self.after = before, after
        self.results: dict[str, dict] = {}

    def _run(self, trainer, pl_module, when: str):
        # imported here: safety_units.evaluation re-exports this class, the target of conf/callbacks/eval.yaml
        from safety_units.evaluation import judge_name, log_results, markdown_table, run_suite

        if weights_sharded(trainer.strategy):
            log.warning("eval callback: weights are sharded under %s; evaluate the exported model with "
                        "`python evaluate.py model=hf model.path=<run dir>/model` instead",
                        type(trainer.strategy).__name__)
            return
        if trainer.is_global_zero:
            dm = trainer.datamodule
            train = {normalize_prompt(p) for p in dm.prompts()} if hasattr(dm, "prompts") else None
            res = run_suite(pl_module.model, pl_module.tokenizer, self.suite, self.judge, train,
                            self.output_dir, prefix=f"eval_{when}")
            self.results[when] = {k: asdict(v) for k, v in res.items()}
            log_results(trainer.loggers, res, prefix=f"eval_{when}", step=trainer.global_step)
            if when == "after" and "before" in self.results:
                table = compare_table(self.results["before"], self.results["after"], judge_name(self.judge))
                (self.output_dir / "eval_compare.md").write_text(table + "\n")
                print("\nbefore / after training:\n" + table + "\n", flush=True)
            else:
                print(f"\n{when} training:\n" + markdown_table(res) + "\n", flush=True)
        trainer.strategy.barrier()

    def on_fit_start(self, trainer, pl_module):
        if self.before and not trainer.ckpt_path:
            self._run(trainer, pl_module, "before")

    def on_train_end(self, trainer, pl_module):
        if self.after:
            self._run(trainer, pl_module, "after")


# --------------------------------------------------------------------------- command line
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


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m safety_units.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run dirs or eval.json files; the first is the baseline")
    ap.add_argument("--out", help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        raise ConfigError("give at least two runs to compare (the first is the baseline).")
    base = load_eval(args.runs[0])
    tables = []
    for other in args.runs[1:]:
        try:
            table = compare_table(base, load_eval(other), labels=("A", "B"))
        except PromptMismatchError as e:
            raise PromptMismatchError(f"{args.runs[0]} vs {other}: {e}") from None
        tables.append(f"A = {args.runs[0]}, B = {other}\n\n{table}\n")
    text = "\n".join(tables)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
