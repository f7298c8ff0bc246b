"""Zero-shot multiple choice by log-likelihood (lm-evaluation-harness style): the common file formats, the
log-likelihood of each choice given its context, and the `mc` eval task (`acc`, and `acc_norm` where choices
differ in length)."""

from __future__ import annotations

import csv
import glob
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from safety_units.data.chat import prompt_text
from safety_units.utils.errors import ConfigError, DataError
from safety_units.models.forward import decoder, eval_mode, head_logits, hidden_states
from safety_units.data.sources import Source
from safety_units.utils.stats import prompt_list_hash, wilson
from safety_units.evaluation.task_results import TaskResult, select_by_hash, task_limit


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
            first = min(p for seq in batch for j in seqs[seq] for p, _ in targets[j])
            with torch.inference_mode():
                hidden, start = shared_prefix_states(model, ids.to(device), mask.to(device), batch, first)
                for r, seq in enumerate(batch):
                    for j in seqs[seq]:  # logits only at the positions asked for, never [batch, seq, vocab]
                        pos = torch.tensor([p - start for p, _ in targets[j]], device=hidden.device)
                        tok = torch.tensor([t for _, t in targets[j]], device=hidden.device)
                        lp = torch.log_softmax(head_logits(model, hidden[r, pos]), dim=-1)
                        out[j] = float(lp[torch.arange(len(tok), device=lp.device), tok].sum())
    return out


MIN_SHARED_PREFIX = 16  # tokens: below this a batch runs in one pass (the cache costs more than it saves)


def shared_prefix_states(model, ids: torch.Tensor, mask: torch.Tensor, seqs: list[tuple],
                         first_target: int) -> tuple[torch.Tensor, int]:
    """(hidden states from position `start` on, start): the tokens every row of the batch begins with (a chat
    template's system prompt and a task's instruction: over half of an SST-2 row) run once, their key/value cache
    repeated over the rows, and the rest of each row on top of it -- the same states as one pass over the whole
    batch, at a fraction of the cost. Only positions up to `first_target` (the first one scored) are shared; a
    model without a key/value cache runs the whole batch."""
    shared = 0
    limit = min(first_target, min(len(s) for s in seqs))
    while shared < limit and all(s[shared] == seqs[0][shared] for s in seqs):
        shared += 1
    if shared < MIN_SHARED_PREFIX or len(seqs) < 2:
        return hidden_states(model, ids, mask), 0
    dec = decoder(model)
    with warnings.catch_warnings():  # transformers >= 5.2x renames past_key_values; older 5.x know only this name
        warnings.simplefilter("ignore", FutureWarning)
        try:
            cache = dec(input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared], use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(seqs))
        except (AttributeError, TypeError, ValueError):  # no (repeatable) cache for this architecture
            return hidden_states(model, ids, mask), 0
        rest = dec(input_ids=ids[:, shared:], attention_mask=mask, past_key_values=cache, use_cache=True)
    return rest.last_hidden_state, shared


def _mc_text(it: MCItem) -> str:
    return "\n".join(it.contexts + it.continuations)


def run_mc(name: str, task: DictConfig, settings: DictConfig, model, tokenizer) -> list[TaskResult]:
    items = load_mc(task.format, task.path)
    items = select_by_hash(items, task_limit(task, settings), f"{settings.get('seed', 0)} {name}", _mc_text)
    pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    scores = loglikelihoods(model, tokenizer, pairs, batch_size=int(settings.batch_size), desc=name)
    correct, correct_norm = [], []
    pos = 0
    for it in items:
        s = scores[pos:pos + len(it.continuations)]
        pos += len(it.continuations)
        norm = [x / max(1, len(k.encode("utf-8"))) for x, k in zip(s, it.continuations)]
        correct.append(int(max(range(len(s)), key=s.__getitem__) == it.gold))
        correct_norm.append(int(max(range(len(norm)), key=norm.__getitem__) == it.gold))
    n = len(items)
    chance = round(sum(1 / len(it.continuations) for it in items) / n, 4)
    prompt_hash = prompt_list_hash([_mc_text(it) for it in items])
    metrics = {"acc": correct, "acc_norm": correct_norm}
    # Dividing by the byte length changes nothing when an item's choices are equally long (MMLU's " A".." D",
    # WinoGrande's shared continuation): acc_norm would only repeat acc.
    if all(len({len(k.encode("utf-8")) for k in it.continuations}) == 1 for it in items):
        del metrics["acc_norm"]
    return [TaskResult(name, m, sum(c) / n, n, *wilson(sum(c), n),
                       {"chance": chance, "prompt_hash": prompt_hash, "outcomes": c}) for m, c in metrics.items()]


def run_label(name: str, task: DictConfig, settings: DictConfig, model, tokenizer) -> list[TaskResult]:
    """`type: label`: a classification set's accuracy by constrained scoring (the fine-tune accuracy, FA, of the
    harmful fine-tuning protocol): each row is chat-formatted as it was trained (`task.source`, whose `labels` map
    the label field to words), and the label word with the highest log-likelihood after the assistant header is
    the prediction. `majority` (the most frequent gold label's share) is the floor a fine-tune must beat."""
    source = OmegaConf.to_container(task.source, resolve=True)
    if not source.get("labels"):
        raise ConfigError(f"eval.tasks.{name}.source.labels is missing: a label task maps the label field to words.")
    words = list(dict.fromkeys(str(w) for w in source["labels"].values()))
    examples = Source.from_config(source, name).load(int(settings.get("seed", 0)))
    examples = select_by_hash(examples, task_limit(task, settings), f"{settings.get('seed', 0)} {name}",
                              lambda ex: ex.prompt)
    contexts = [prompt_text(tokenizer, ex.messages) for ex in examples]
    scores = loglikelihoods(model, tokenizer, [(c, w) for c in contexts for w in words],
                            batch_size=int(settings.batch_size), desc=name)
    gold = [words.index(ex.response) for ex in examples]
    pred = [max(range(len(words)), key=lambda k: scores[i * len(words) + k]) for i in range(len(examples))]
    correct = [int(p == g) for p, g in zip(pred, gold)]
    n = len(examples)
    majority = round(max(gold.count(k) for k in range(len(words))) / n, 4)
    extra = {"majority": majority, "labels": words, "prompt_hash": prompt_list_hash([ex.prompt for ex in examples]),
             "outcomes": correct, "predicted_share": {w: pred.count(k) / n for k, w in enumerate(words)}}
    return [TaskResult(name, "acc", sum(correct) / n, n, *wilson(sum(correct), n), extra)]
