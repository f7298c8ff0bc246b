"""Evaluation: refusal / attack success, over-refusal, multiple-choice utility, perplexity.

Task types (a task is one entry of `eval.tasks`):
* `refusal`: generate greedy answers to a prompt set and judge them. `report: asr` gives the attack success rate
  (share answered without refusal and at least `judge.min_words` long), `report: refusal_rate` the share refused.
  Prompts found (by normalised text) in the fixed `eval.dedupe_against` sets are removed first and counted.
* `mc`: zero-shot multiple choice by log-likelihood of each choice given the question (lm-evaluation-harness
  style, safety_units.evaluation.multiple_choice): `acc` (sum of log-probs) and, where choices differ in length, `acc_norm` (divided by the byte length).
* `ppl`: perplexity of held-out reference responses (response tokens only, chat template applied).
* `rejudge`: judge saved completions from a file, no model (safety_units.evaluation.rejudge).

Every model sees the same prompts: a `limit` keeps the items with the smallest stable hash, and the evaluated
model's own training data is never removed, only counted (`extra.train_overlap`). Every result carries n, a 95%
interval (Wilson for rates, bootstrap over examples for perplexity), `extra.prompt_hash` and the per-example
`extra.outcomes` that safety_units.evaluation.compare pairs between runs.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from safety_units.data.datamodule import collate, encode_example

from safety_units.utils.ranks import RankedLogger
from safety_units.data.sources import Source, normalize_prompt, normalized_prompts
from safety_units.utils.errors import ConfigError
from safety_units.utils.config import instantiate
from safety_units.data.generation import generate_chat
from safety_units.models.forward import eval_mode, response_token_nll
from safety_units.evaluation.multiple_choice import run_label, run_mc
from safety_units.data.pairs import ROW_KEYS
from safety_units.evaluation.rejudge import load_completions
from safety_units.evaluation.judges.refusal import check_judge
from safety_units.utils.stats import prompt_list_hash
from safety_units.evaluation.task_results import (
    TaskResult,
    refusal_result,
    select_by_hash,
    task_limit,
)

log = RankedLogger(__name__)

TASK_TYPES = ("refusal", "mc", "label", "ppl", "rejudge")
MODEL_FREE_TASKS = ("rejudge",)  # tasks that judge saved completions: no model needed


# --------------------------------------------------------------------------- prompt sets and dedupe
def prompt_set_texts(sources: dict | DictConfig | None, seed: int = 0, where: str = "eval.dedupe_against") -> set[str]:
    """Normalised prompts of every source, whole files (`where` names the sources in errors). The row keys of pair
    data (data=preference's `rejected`, data=unlearning's `role`) are not Source keys and are left out."""
    if sources:
        plain = {}
        for name, cfg in sources.items():
            cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg or {})
            plain[name] = {k: v for k, v in cfg.items() if k not in ROW_KEYS}
        sources = plain
    return normalized_prompts(sources, seed, where)


def training_prompts_of(model_dir: str | Path | None) -> set[str] | None:
    """Prompts of the training sources of a safety_units-trained model (from the config exported with it), whole
    files before any cap; None when the model's training data is unknown."""
    if not model_dir:
        return None
    cfg_path = Path(model_dir) / "safety_units_config.yaml"
    if not cfg_path.is_file():
        return None
    sources = OmegaConf.load(cfg_path).get("data", {}).get("sources", {})
    log.info("train_overlap: counting eval prompts found in the %d training sources of %s", len(sources), model_dir)
    return prompt_set_texts(sources, where=f"{cfg_path}: data.sources")


def train_overlap(name: str, prompts: list[str], train_prompts: set[str] | None) -> int | None:
    """How many eval prompts the evaluated model trained on (None: unknown). Counted, never removed, so every
    model keeps the same prompts; a warning makes the contamination visible."""
    if train_prompts is None:
        return None
    n = sum(normalize_prompt(p) in train_prompts for p in prompts)
    if n:
        log.warning("eval.tasks.%s: %d of %d prompts occur in the evaluated model's training data "
                    "(kept, reported as extra.train_overlap).", name, n, len(prompts))
    return n


# --------------------------------------------------------------------------- refusal tasks
def refusal_prompts(name: str, task: DictConfig, settings: DictConfig,
                    exclude: set[str]) -> tuple[Source, list, int]:
    """The prompts of a refusal task, the same for every model: (source, examples, number removed by `exclude`)."""
    # A suite-wide attack setting (e.g. the AOA system prompt and template) fills in what the task leaves unset;
    # merged before building the source so it is validated like the task's own.
    source = OmegaConf.to_container(task.source, resolve=True)
    for key in ("system", "template"):
        if settings.get(key) is not None and source.get(key) is None:
            source[key] = settings.get(key)
    src = Source.from_config(source, name)
    src.limit = None
    examples = src.load(int(settings.get("seed", 0)), require_response=False)
    n_before = len(examples)
    if task.get("dedupe", True) and exclude:
        examples = [ex for ex in examples if normalize_prompt(ex.prompt) not in exclude]
    removed = n_before - len(examples)
    if not examples:
        raise ConfigError(f"eval.tasks.{name}: no prompts left ({removed} removed as found in eval.dedupe_against).")
    key = f"{settings.get('seed', 0)} {name}"
    return src, select_by_hash(examples, task_limit(task, settings), key, lambda ex: ex.prompt), removed


def run_refusal(name: str, task: DictConfig, settings: DictConfig, model, tokenizer, judge,
                exclude: set[str], train_prompts: set[str] | None = None,
                completions: list[str] | None = None) -> tuple[TaskResult, list[dict]]:
    """Generate (unless `completions`, from pooled_completions, are given) and judge one refusal task."""
    report = task.get("report", "refusal_rate")
    if report not in ("asr", "refusal_rate"):
        raise ConfigError(f"eval.tasks.{name}.report must be asr or refusal_rate, got {report!r}.")
    src, examples, removed = refusal_prompts(name, task, settings, exclude)
    prompts = [ex.prompt for ex in examples]
    if completions is None:
        completions = generate_chat(model, tokenizer, [ex.messages for ex in examples],
                                    max_new_tokens=int(task.get("max_new_tokens") or settings.max_new_tokens),
                                    batch_size=int(settings.batch_size), desc=name)
    extra = {"overlaps_removed": removed, "train_overlap": train_overlap(name, prompts, train_prompts),
             "source": str(src.path)}
    if src.system or src.template:
        extra.update(system=src.system, template=src.template)
    return refusal_result(name, report, prompts, completions, judge.judge(prompts, completions), judge, extra)


def pooled_completions(tasks: DictConfig, settings: DictConfig, model, tokenizer,
                       exclude: set[str]) -> dict[str, list[str]]:
    """eval.pool_generation: the prompts of every refusal task generated together, one batched pass per
    max_new_tokens -- fewer, fuller batches (on a GPU a batch of a small model costs about the same at any size).
    Off by default: then a task's completions never depend on which other tasks run beside it."""
    groups: dict[int, list[tuple[str, list]]] = {}
    for name, task in tasks.items():
        if task is not None and task.get("type") == "refusal":
            _, examples, _ = refusal_prompts(name, task, settings, exclude)
            n_new = int(task.get("max_new_tokens") or settings.max_new_tokens)
            groups.setdefault(n_new, []).append((name, [ex.messages for ex in examples]))
    out: dict[str, list[str]] = {}
    for n_new, parts in groups.items():
        done = generate_chat(model, tokenizer, [m for _, msgs in parts for m in msgs], max_new_tokens=n_new,
                             batch_size=int(settings.batch_size), desc="+".join(name for name, _ in parts))
        for name, msgs in parts:
            out[name], done = done[:len(msgs)], done[len(msgs):]
    return out


def run_rejudge(name: str, task: DictConfig, settings: DictConfig, judge) -> tuple[TaskResult, list[dict]]:
    """Judge saved completions (no model): see safety_units.evaluation.rejudge."""
    source = OmegaConf.to_container(task.get("source") or {}, resolve=True)
    prompts, completions, rows = load_completions(source, name)
    keep = select_by_hash(list(range(len(rows))), task_limit(task, settings), f"{settings.get('seed', 0)} {name}",
                          lambda i: f"{prompts[i]}\x00{completions[i]}\x00{i}")
    prompts, completions, rows = [prompts[i] for i in keep], [completions[i] for i in keep], [rows[i] for i in keep]
    result, out = refusal_result(name, task.get("report", "refusal_rate"), prompts, completions,
                                 judge.judge(prompts, completions), judge, {"source": str(source["path"])})
    for rec, row in zip(out, rows):  # keep the saved file's own task name next to the re-judged one
        if isinstance(row.get("task"), str) and row["task"] != name:
            rec["source_task"] = row["task"]
    return result, out


# --------------------------------------------------------------------------- perplexity
def run_ppl(name: str, task: DictConfig, settings: DictConfig, model, tokenizer,
            train_prompts: set[str] | None = None) -> TaskResult:
    src = Source.from_config(task.source, name)
    src.limit = None
    examples = src.load(int(settings.get("seed", 0)))
    examples = select_by_hash(examples, task_limit(task, settings), f"{settings.get('seed', 0)} {name}",
                              lambda ex: ex.prompt)
    max_length = int(task.get("max_length", 512))
    enc = [encode_example(tokenizer, ex.messages, max_length) for ex in examples]
    device = next(model.parameters()).device
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i].input_ids))
    bs = int(settings.batch_size)
    per_example = [None] * len(enc)
    with eval_mode(model):
        for b in tqdm(range(0, len(order), bs), desc=name, leave=False):
            idx = order[b:b + bs]
            batch = {k: v.to(device) for k, v in collate([enc[i] for i in idx], tokenizer.pad_token_id, 1).items()}
            with torch.inference_mode():
                tok_nll, counts = response_token_nll(model, batch)
            for i, part, n_tok in zip(idx, torch.split(tok_nll.cpu(), counts.tolist()), counts.tolist()):
                per_example[i] = (float(part.double().sum()), int(n_tok))
    nll = [p[0] for p in per_example]
    count = [p[1] for p in per_example]
    ppl = math.exp(sum(nll) / max(1, sum(count)))
    rng = random.Random(f"{settings.get('seed', 0)}:{name}:bootstrap")
    boots = []
    for _ in range(1000):
        pick = [rng.randrange(len(nll)) for _ in nll]
        boots.append(math.exp(sum(nll[i] for i in pick) / max(1, sum(count[i] for i in pick))))
    boots.sort()
    prompts = [ex.prompt for ex in examples]
    return TaskResult(name, "ppl", ppl, len(nll), boots[24], boots[974], {
        "tokens": sum(count), "interval": "bootstrap",
        "train_overlap": train_overlap(name, prompts, train_prompts),
        "prompt_hash": prompt_list_hash([f"{ex.prompt}\x00{ex.response}" for ex in examples]),
        "outcomes": [list(p) for p in per_example]})


# --------------------------------------------------------------------------- the suite
def build_judge(judge_cfg):
    """The refusal judge of a `judge` config: the class its `_target_` names (conf/judge/), which answers
    judge(prompts, completions) -> [Verdict]."""
    if judge_cfg is None or "_target_" not in judge_cfg:
        raise ConfigError(f"judge needs a _target_ (a judge class, e.g. judge=patterns from conf/judge/), "
                          f"got {judge_cfg!r}.")
    return check_judge(instantiate(judge_cfg, "judge"), "judge")


def run_suite(model, tokenizer, eval_cfg: DictConfig, judge, train_prompts: set[str] | None = None,
              output_dir: str | Path | None = None, prefix: str = "eval") -> dict[str, TaskResult]:
    """Run every task of `eval_cfg.tasks`; write `<prefix>.json` and `generations.jsonl` into output_dir.

    Prompt sets are de-duplicated against `eval_cfg.dedupe_against` only, the same for every model;
    `train_prompts` (normalised prompts the evaluated model trained on, None if unknown) are only counted."""
    tasks = eval_cfg.get("tasks") or {}
    if not tasks:
        raise ConfigError("eval.tasks is empty: choose eval=suite, eval=harmful, ... or add tasks.")
    needs_dedupe = any(t is not None and t.get("type") == "refusal" for t in tasks.values())
    exclude = prompt_set_texts(eval_cfg.get("dedupe_against")) if needs_dedupe else set()
    results: dict[str, TaskResult] = {}
    generations: list[dict] = []
    for name, task in tasks.items():
        if task is not None and task.get("type") not in TASK_TYPES:
            raise ConfigError(f"eval.tasks.{name}.type must be one of {TASK_TYPES}, got {task.get('type')!r}.")
    pooled = pooled_completions(tasks, eval_cfg, model, tokenizer, exclude) \
        if eval_cfg.get("pool_generation", False) else {}
    for name, task in tasks.items():
        if task is None:
            continue
        kind = task.get("type")
        if kind == "refusal":
            res, rows = run_refusal(name, task, eval_cfg, model, tokenizer, judge, exclude, train_prompts,
                                    completions=pooled.get(name))
            results[name] = res
            generations += rows
        elif kind == "rejudge":
            results[name], rows = run_rejudge(name, task, eval_cfg, judge)
            generations += rows
        elif kind == "mc":
            for r in run_mc(name, task, eval_cfg, model, tokenizer):
                results[f"{name}/{r.metric}"] = r
        elif kind == "label":
            results[name] = run_label(name, task, eval_cfg, model, tokenizer)[0]
        else:
            results[name] = run_ppl(name, task, eval_cfg, model, tokenizer, train_prompts)
        log.info("%s", " ".join(f"{k}={v.value:.4f}" for k, v in results.items() if k.split("/")[0] == name))
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{prefix}.json").write_text(json.dumps({k: asdict(v) for k, v in results.items()}, indent=2))
        with open(out / ("generations.jsonl" if prefix == "eval" else f"generations_{prefix}.jsonl"), "w") as f:
            for row in generations:
                f.write(json.dumps(row) + "\n")
    return results


def log_results(loggers, results: dict[str, TaskResult], prefix: str = "eval", step: int = 0) -> None:
    metrics = {f"{prefix}/{k}" if "/" in k else f"{prefix}/{k}/{v.metric}": v.value for k, v in results.items()}
    for lg in loggers or []:
        lg.log_metrics(metrics, step=step)
        lg.save()
