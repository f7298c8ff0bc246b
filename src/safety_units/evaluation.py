"""Evaluation: refusal / attack success, over-refusal, multiple-choice utility, perplexity, unit ablation.

Task types (a task is one entry of `eval.tasks`):
* `refusal`: generate greedy answers to a prompt set and judge them. `report: asr` gives the attack success rate
  (share answered without refusal and at least `judge.min_words` long), `report: refusal_rate` the share refused.
  Prompts found (by normalised text) in any training or calibration prompt set are removed first and counted.
* `mc`: zero-shot multiple choice by log-likelihood of each choice given the question (lm-evaluation-harness
  style): `acc` (sum of log-probs) and `acc_norm` (divided by the choice's length in bytes).
* `ppl`: perplexity of held-out reference responses (response tokens only, chat template applied).

Every result carries n and a 95% interval (Wilson for rates, bootstrap over examples for perplexity).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from safety_units.callbacks import weights_sharded
from safety_units.data import Source, collate, encode_example, normalize_prompt, subsample
from safety_units.errors import ConfigError, DataError
from safety_units.generation import generate_chat
from safety_units.models import eval_mode
from safety_units.scoring import head_logits, hidden_states, response_token_nll

log = logging.getLogger(__name__)

TASK_TYPES = ("refusal", "mc", "ppl")


# --------------------------------------------------------------------------- statistics
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


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


# --------------------------------------------------------------------------- prompt sets and dedupe
def prompt_set_texts(sources: dict | DictConfig | None, seed: int = 0) -> set[str]:
    """Normalised prompts of every source (for removing train/calibration prompts from eval sets)."""
    out: set[str] = set()
    for name, cfg in (sources or {}).items():
        if cfg is None:
            continue
        src = Source.from_config(cfg, name)
        src.limit, src.self_distill = None, False
        try:
            out |= {normalize_prompt(ex.prompt) for ex in src.load(seed, require_response=False)}
        except DataError as e:
            raise ConfigError(f"eval.dedupe_against.{name}: {e}") from None
    return out


def training_prompts_of(model_dir: str | Path | None) -> set[str]:
    """Prompts a safety_units-trained model saw: read from the resolved config exported with it."""
    if not model_dir:
        return set()
    cfg_path = Path(model_dir) / "safety_units_config.yaml"
    if not cfg_path.is_file():
        return set()
    cfg = OmegaConf.load(cfg_path)
    sources = cfg.get("data", {}).get("sources", {})
    log.info("dedupe: also removing the %d training sources of %s", len(sources), model_dir)
    return prompt_set_texts(sources)


# --------------------------------------------------------------------------- refusal tasks
def run_refusal(name: str, task: DictConfig, settings: DictConfig, model, tokenizer, judge,
                exclude: set[str]) -> tuple[TaskResult, list[dict]]:
    report = task.get("report", "refusal_rate")
    if report not in ("asr", "refusal_rate"):
        raise ConfigError(f"eval.tasks.{name}.report must be asr or refusal_rate, got {report!r}.")
    # A suite-wide attack setting (e.g. the AOA system prompt and template) fills in what the task leaves unset;
    # merged before building the source so it is validated like the task's own.
    source = OmegaConf.to_container(task.source, resolve=True)
    for key in ("system", "template"):
        if settings.get(key) is not None and source.get(key) is None:
            source[key] = settings.get(key)
    src = Source.from_config(source, name)
    limit = task_limit(task, settings)
    src.limit = None
    examples = src.load(int(settings.get("seed", 0)), require_response=False)
    n_before = len(examples)
    if task.get("dedupe", True) and exclude:
        examples = [ex for ex in examples if normalize_prompt(ex.prompt) not in exclude]
    removed = n_before - len(examples)
    if limit and len(examples) > limit:
        examples = subsample(examples, int(limit), f"{settings.get('seed', 0)}:{name}")
    if not examples:
        raise ConfigError(f"eval.tasks.{name}: no prompts left ({removed} removed as training/calibration overlap).")
    completions = generate_chat(model, tokenizer, [ex.messages for ex in examples],
                           max_new_tokens=int(task.get("max_new_tokens") or settings.max_new_tokens),
                           batch_size=int(settings.batch_size), desc=name)
    verdicts = judge.judge([ex.prompt for ex in examples], completions)
    n = len(verdicts)
    refused = sum(v.refusal for v in verdicts)
    success = sum(v.attack_success() for v in verdicts)
    k = success if report == "asr" else refused
    lo, hi = wilson(k, n)
    result = TaskResult(name, report, k / n, n, lo, hi, {"refusals": refused, "attack_successes": success,
                                                         "short": sum(v.short for v in verdicts),
                                                         "overlaps_removed": removed, "source": str(src.path)})
    rows = [{"task": name, "prompt": ex.prompt, "completion": c, "refusal": v.refusal, "short": v.short,
             "reason": v.reason} for ex, c, v in zip(examples, completions, verdicts)]
    if src.system or src.template:
        result.extra.update(system=src.system, template=src.template)
    return result, rows


# --------------------------------------------------------------------------- multiple choice
@dataclass
class MCItem:
    contexts: list[str]  # one per choice (identical except for WinoGrande-style partial scoring)
    continuations: list[str]
    gold: int


def _hellaswag_clean(text: str) -> str:
    import re

    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _read_table(path: Path, fmt: str) -> list:
    if fmt == "mmlu_csv":
        return list(csv.reader(path.read_text(encoding="utf-8").splitlines(keepends=True)))
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data.get("data", [])
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_mc(fmt: str, path_pattern: str) -> list[MCItem]:
    """Multiple-choice items from the common file formats."""
    paths = sorted(Path(p) for p in glob.glob(str(path_pattern)))
    if not paths:
        raise DataError(f"no multiple-choice files match {path_pattern}.")
    items: list[MCItem] = []
    for path in paths:
        for i, r in enumerate(_read_table(path, fmt), 1):
            try:
                items.append(_mc_item(fmt, r, path))
            except (KeyError, IndexError, ValueError, TypeError) as e:
                raise DataError(f"{path}: row {i} is not a valid {fmt} item ({type(e).__name__}: {e}).") from None
    return items


def _mc_item(fmt: str, r, path: Path) -> MCItem:
    if fmt == "mmlu_csv":
        q, *choices, ans = r
        if len(choices) != 4 or ans.strip() not in "ABCD" or not ans.strip():
            raise ValueError("need question, 4 choices and an answer letter A-D")
        subject = path.stem.rsplit("_", 1)[0].replace("_", " ")
        ctx = (f"The following are multiple choice questions (with answers) about {subject}.\n\n{q.strip()}\n"
               + "".join(f"{l}. {c.strip()}\n" for l, c in zip("ABCD", choices)) + "Answer:")
        return MCItem([ctx] * 4, [" A", " B", " C", " D"], "ABCD".index(ans.strip()))
    if fmt in ("arc_jsonl", "openbookqa"):
        q = r["question"]
        if isinstance(q, dict):  # AI2 release format
            stem, texts, labels = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
        else:  # Hugging Face format
            stem = q if fmt == "arc_jsonl" else r.get("question_stem", q)
            texts, labels = r["choices"]["text"], r["choices"]["label"]
        ctx = f"Question: {stem}\nAnswer:" if fmt == "arc_jsonl" else stem
        return MCItem([ctx] * len(texts), [f" {t}" for t in texts], labels.index(r["answerKey"]))
    if fmt == "hellaswag":
        ctx_b = r.get("ctx_b", "")
        ctx = r.get("ctx") or f"{r['ctx_a']} {ctx_b.capitalize()}"
        ctx = _hellaswag_clean(f"{r['activity_label']}: {ctx}")
        return MCItem([ctx] * len(r["endings"]), [" " + _hellaswag_clean(e) for e in r["endings"]], int(r["label"]))
    if fmt == "boolq":
        gold = r["answer"] if "answer" in r else r["label"]
        ctx = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
        return MCItem([ctx] * 2, [" no", " yes"], int(bool(gold)))
    if fmt == "piqa":
        ctx = f"Question: {r['goal']}\nAnswer:"
        return MCItem([ctx] * 2, [f" {r['sol1']}", f" {r['sol2']}"], int(r["label"]))
    if fmt == "winogrande":
        s = r["sentence"]
        idx = s.index("_")
        cont = " " + s[idx + 1:].strip()
        return MCItem([s[:idx] + r["option1"], s[:idx] + r["option2"]], [cont, cont], int(r["answer"]) - 1)
    raise ConfigError(f"unknown multiple-choice format {fmt!r}; use mmlu_csv, arc_jsonl, openbookqa, hellaswag, "
                      f"boolq, piqa or winogrande.")


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness convention: trailing spaces of the context move to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not cont or whole[:len(ctx)] != ctx:  # tokenisation did not split at the boundary
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not ctx and tokenizer.bos_token_id is not None:
        ctx = [tokenizer.bos_token_id]
    return ctx, cont


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16, max_length: int = 2048,
                   progress: bool = True, desc: str = "loglik") -> list[float]:
    """sum log p(continuation | context) for each pair; requests sharing a prefix share one forward pass
    (e.g. MMLU's four single-token answers after the same question)."""
    device = next(model.parameters()).device
    seqs: dict[tuple, list[int]] = {}  # model input -> indices of the requests it serves
    targets = []
    for j, (ctx, cont) in enumerate(pairs):
        c, k = _encode_pair(tokenizer, ctx, cont)
        full = (c + k)[-(max_length + 1):]
        seq = tuple(full[:-1])  # the model reads full[:-1] and predicts the last len(k) tokens
        seqs.setdefault(seq, []).append(j)
        targets.append([(p, full[p + 1]) for p in range(len(full) - 1 - len(k), len(full) - 1)])
    out = [0.0] * len(pairs)
    inputs = sorted(seqs, key=len, reverse=True)
    with eval_mode(model):
        for b in tqdm(range(0, len(inputs), batch_size), desc=desc, disable=not progress, leave=False):
            batch = inputs[b:b + batch_size]
            width = len(batch[0])
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, seq in enumerate(batch):
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            with torch.inference_mode():
                hidden = hidden_states(model, ids.to(device), mask.to(device))
                for r, seq in enumerate(batch):
                    for j in seqs[seq]:  # logits only at the positions asked for, never [batch, seq, vocab]
                        pos = torch.tensor([p for p, _ in targets[j]], device=hidden.device)
                        tok = torch.tensor([t for _, t in targets[j]], device=hidden.device)
                        lp = torch.log_softmax(head_logits(model, hidden[r, pos]), dim=-1)
                        out[j] = float(lp[torch.arange(len(tok), device=lp.device), tok].sum())
    return out


def run_mc(name: str, task: DictConfig, settings: DictConfig, model, tokenizer) -> list[TaskResult]:
    items = load_mc(task.format, task.path)
    limit = task_limit(task, settings)
    if limit and len(items) > limit:
        items = subsample(items, int(limit), f"{settings.get('seed', 0)}:{name}")
    pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    scores = loglikelihoods(model, tokenizer, pairs, batch_size=int(settings.batch_size), desc=name)
    correct = correct_norm = 0
    pos = 0
    for it in items:
        s = scores[pos:pos + len(it.continuations)]
        pos += len(it.continuations)
        norm = [x / max(1, len(k.encode("utf-8"))) for x, k in zip(s, it.continuations)]
        correct += int(max(range(len(s)), key=s.__getitem__) == it.gold)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == it.gold)
    n = len(items)
    chance = sum(1 / len(it.continuations) for it in items) / n
    return [TaskResult(name, "acc", correct / n, n, *wilson(correct, n), {"chance": round(chance, 4)}),
            TaskResult(name, "acc_norm", correct_norm / n, n, *wilson(correct_norm, n), {"chance": round(chance, 4)})]


# --------------------------------------------------------------------------- perplexity
def run_ppl(name: str, task: DictConfig, settings: DictConfig, model, tokenizer) -> TaskResult:
    src = Source.from_config(task.source, name)
    limit = task_limit(task, settings)
    src.limit = limit
    examples = src.load(int(settings.get("seed", 0)))
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
    return TaskResult(name, "ppl", ppl, len(nll), boots[24], boots[974], {"tokens": sum(count),
                                                                        "interval": "bootstrap"})


# --------------------------------------------------------------------------- the suite
def build_judge(judge_cfg):
    from safety_units.config import instantiate

    return instantiate(judge_cfg, "judge")


def run_suite(model, tokenizer, eval_cfg: DictConfig, judge, exclude: set[str] | None = None,
              output_dir: str | Path | None = None, prefix: str = "eval") -> dict[str, TaskResult]:
    """Run every task of `eval_cfg.tasks`; write `<prefix>.json` and `generations.jsonl` into output_dir."""
    tasks = eval_cfg.get("tasks") or {}
    if not tasks:
        raise ConfigError("eval.tasks is empty: choose eval=suite, eval=harmful, ... or add tasks.")
    exclude = set(exclude or set())
    if eval_cfg.get("dedupe_against"):
        exclude |= prompt_set_texts(eval_cfg.dedupe_against)
    results: dict[str, TaskResult] = {}
    generations: list[dict] = []
    for name, task in tasks.items():
        if task is None:
            continue
        kind = task.get("type")
        if kind not in TASK_TYPES:
            raise ConfigError(f"eval.tasks.{name}.type must be one of {TASK_TYPES}, got {kind!r}.")
        if kind == "refusal":
            res, rows = run_refusal(name, task, eval_cfg, model, tokenizer, judge, exclude)
            results[name] = res
            generations += rows
        elif kind == "mc":
            for r in run_mc(name, task, eval_cfg, model, tokenizer):
                results[f"{name}/{r.metric}"] = r
        else:
            results[name] = run_ppl(name, task, eval_cfg, model, tokenizer)
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


# --------------------------------------------------------------------------- before/after callback
def compare_table(before: dict[str, TaskResult], after: dict[str, TaskResult]) -> str:
    lines = ["| task | metric | before | after | change | n |", "|---|---|---:|---:|---:|---:|"]
    for k, b in before.items():
        a = after.get(k)
        if a is None:
            continue
        lines.append(f"| {b.task} | {b.metric} | {b.value:.4f} [{b.ci_low:.3f}, {b.ci_high:.3f}] | "
                     f"{a.value:.4f} [{a.ci_low:.3f}, {a.ci_high:.3f}] | {a.value - b.value:+.4f} | {a.n} |")
    return "\n".join(lines)


class EvalCallback(pl.Callback):
    """Runs an eval suite before and after training (on rank 0) and writes a before/after table.

    Configured by callbacks=eval; the tokenizer comes from the LightningModule (`pl_module.tokenizer`), and the
    training prompts are removed from the eval prompt sets.
    """

    def __init__(self, suite: DictConfig, judge, output_dir: str | Path, before: bool = True, after: bool = True):
        self.suite, self.judge = suite, judge
        self.output_dir = Path(output_dir)
        self.before, self.after = before, after
        self.exclude: set[str] | None = None
        self.results: dict[str, dict] = {}
        self._tables: dict[str, dict[str, TaskResult]] = {}

    def _run(self, trainer, pl_module, when: str):
        if weights_sharded(trainer.strategy):
            log.warning("eval callback: weights are sharded under %s; evaluate the exported model with "
                        "`python evaluate.py model=hf model.path=<run dir>/model` instead",
                        type(trainer.strategy).__name__)
            return
        if trainer.is_global_zero:
            if self.exclude is None:
                dm = trainer.datamodule
                self.exclude = {normalize_prompt(p) for p in dm.prompts()} if hasattr(dm, "prompts") else set()
            res = run_suite(pl_module.model, pl_module.tokenizer, self.suite, self.judge, self.exclude,
                            self.output_dir, prefix=f"eval_{when}")
            self.results[when] = {k: asdict(v) for k, v in res.items()}
            log_results(trainer.loggers, res, prefix=f"eval_{when}", step=trainer.global_step)
            self._tables[when] = res
            if when == "after" and "before" in self._tables:
                table = compare_table(self._tables["before"], res)
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


# --------------------------------------------------------------------------- ablation
def ablate_units(model, selection: dict[str, torch.Tensor], names: dict | None = None) -> dict:
    """Zero every parameter slice of the selected units (rows of gate/up, columns of down/o_proj)."""
    from safety_units.units import resolve_units

    zeroed = {"units_zeroed": 0, "entries_zeroed": 0}
    with torch.no_grad():
        for g in resolve_units(model, names):
            sel = selection.get(g.key)
            if sel is None or not sel.any():
                continue
            idx = torch.nonzero(sel).flatten()
            zeroed["units_zeroed"] += len(idx)
            for s in g.slices:
                s.param.index_fill_(s.dim, idx.to(s.param.device), 0.0)
                zeroed["entries_zeroed"] += len(idx) * (s.param.numel() // s.param.shape[s.dim])
    return zeroed
