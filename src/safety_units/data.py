"""Data: read CSV / JSON / JSONL / TXT with a field mapping, apply the chat template, mask the prompt.

A *source* is one file plus a field mapping (see `SOURCE_KEYS`). Sources are combined by `SFTDataModule`
(weights for mixing refusal pairs with benign data) or read by evaluation tasks as prompt sets.

Row numbers in errors are 1-based data rows (CSV: the header is line 1, so data row r is line r + 1).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from safety_units.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Every key a source may carry; anything else is a typo and an error.
SOURCE_KEYS = {
    "path": "file to read (.csv, .json, .jsonl, .txt)",
    "format": "auto | csv | json | jsonl | txt (auto: from the suffix)",
    "records": "for a JSON object: the key holding the list of rows (e.g. 'instructions')",
    "prompt": "field with the user prompt",
    "input": "optional field appended to the prompt after a blank line (Alpaca 'input')",
    "response": "field with the assistant response; null for prompt-only sets",
    "messages": "field with a list of {role, content} turns ('.' when the row itself is that list)",
    "system": "system prompt to put before the user turn (null: the template's default)",
    "template": "format string for the user turn, e.g. 'AOA, execute my instruction: {prompt}'",
    "strip_inst": "strip Llama-2 [INST] ... [/INST] / <<SYS>> markup from prompts",
    "where": "row filter: {field: value or [values]}",
    "hash_split": "[lo, hi): keep rows whose prompt hashes into this fraction (stable train/eval partition)",
    "limit": "keep at most this many rows (seeded random subset)",
    "weight": "mixing weight when the datamodule sets num_samples",
    "self_distill": "prompt-only source: generate responses once with the model being trained",
    "on_bad_row": "error (default) | skip: what to do with a malformed row",
    "name": "label used in logs and reports",
}


@dataclass
class Example:
    messages: list[dict]  # [{role, content}], ending with an assistant turn unless prompt-only
    source: str
    row: int  # 1-based data row in the file
    raw_prompt: str | None = None  # the prompt before a source template was applied

    @property
    def prompt(self) -> str:
        """The prompt as in the file (for de-duplication and reports); the user turn may wrap it in a template."""
        if self.raw_prompt is not None:
            return self.raw_prompt
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""

    @property
    def response(self) -> str | None:
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else None


# --------------------------------------------------------------------------- text helpers
_INST = re.compile(r"<<SYS>>.*?<</SYS>>|\[/?INST\]|<s>|</s>", re.DOTALL)


def strip_llama2_markup(text: str) -> str:
    """'[INST] <<SYS>>..<</SYS>> Do X [/INST]' -> 'Do X' (Wei et al.'s safety-short prompts carry this markup)."""
    return _INST.sub(" ", text).strip()


def normalize_prompt(text: str) -> str:
    """Normalised text for de-duplication and hash splits: lower case, alphanumerics, single spaces."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", strip_llama2_markup(text).lower()).split())


def stable_fraction(text: str) -> float:
    """A deterministic number in [0, 1) from a prompt: the basis of hash splits (stable across caps/orderings)."""
    h = hashlib.sha1(normalize_prompt(text).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


# --------------------------------------------------------------------------- reading files
def subsample(items: list, k: int, key: str) -> list:
    """k items drawn by a generator seeded with `key`, in their original order (the same draw on every run)."""
    rng = random.Random(key)
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".csv", ".json", ".jsonl", ".txt"):
        return suffix[1:]
    raise DataError(f"{path}: cannot tell the format from the suffix '{suffix}'; set format: csv|json|jsonl|txt.")


def read_rows(path: str | Path, fmt: str = "auto", records: str | None = None) -> list[Any]:
    """Rows of a file as python objects (dicts, or lists for conversation files)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist (data lives in ../shared/data, see its SOURCES.md).")
    fmt = _detect_format(p, fmt)
    text = p.read_text(encoding="utf-8")
    if fmt == "csv":
        return list(csv.DictReader(text.splitlines(keepends=True)))
    if fmt == "txt":
        return [{"text": line.strip()} for line in text.splitlines() if line.strip()]
    if fmt == "jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {i} is not valid JSON ({e.msg}).") from None
        return rows
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        if isinstance(data, dict):
            return _rows_from_object(p, data, records)
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of rows, got {type(data).__name__}.")
        return data
    raise DataError(f"{p}: unknown format '{fmt}'; use csv, json, jsonl or txt.")


def _rows_from_object(p: Path, data: dict, records: str | None) -> list[Any]:
    """A JSON object of parallel lists, e.g. {"instructions": [...], "tags": [...]}, becomes rows."""
    if records is None:
        lists = {k: len(v) for k, v in data.items() if isinstance(v, list) and v}
        if not lists or len(set(lists.values())) != 1:
            raise DataError(f"{p}: a JSON object with keys {sorted(data)}; set `records:` to the key holding the rows.")
        records = sorted(lists)[0]
    if records not in data or not isinstance(data[records], list):
        raise DataError(f"{p}: records={records!r} is not a list in this file (keys: {sorted(data)}).")
    main = data[records]
    if main and isinstance(main[0], dict):
        return main
    n = len(main)
    parallel = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == n}
    return [{k: v[i] for k, v in parallel.items()} for i in range(n)]


# --------------------------------------------------------------------------- sources
@dataclass
class Source:
    path: str
    name: str = ""
    format: str = "auto"
    records: str | None = None
    prompt: str = "prompt"
    input: str | None = None
    response: str | None = "response"
    messages: str | None = None
    system: str | None = None
    template: str | None = None
    strip_inst: bool = False
    where: dict | None = None
    hash_split: list | None = None
    limit: int | None = None
    weight: float = 1.0
    self_distill: bool = False
    on_bad_row: str = "error"

    @classmethod
    def from_config(cls, cfg, name: str = "") -> "Source":
        from omegaconf import OmegaConf

        d = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
        unknown = sorted(set(d) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(
                f"data source '{name}': unknown key(s) {unknown}. Valid keys: "
                + "; ".join(f"{k} ({v})" for k, v in SOURCE_KEYS.items())
            )
        if not d.get("path"):
            raise ConfigError(f"data source '{name}' has no `path`.")
        d.setdefault("name", name or Path(d["path"]).stem)
        src = cls(**d)
        if src.on_bad_row not in ("error", "skip"):
            raise ConfigError(f"data source '{name}': on_bad_row must be 'error' or 'skip', got {src.on_bad_row!r}.")
        if src.hash_split is not None:
            lo, hi = src.hash_split
            if not 0.0 <= lo < hi <= 1.0:
                raise ConfigError(f"data source '{name}': hash_split must be [lo, hi) within [0, 1], got {src.hash_split}.")
        if src.template is not None and "{prompt}" not in src.template:
            raise ConfigError(f"data source '{name}': template must contain {{prompt}}, got {src.template!r}.")
        if src.limit is not None and src.limit < 1:
            raise ConfigError(f"data source '{name}': limit must be a positive number of rows or null.")
        return src

    def load(self, seed: int = 0, require_response: bool | None = None) -> list[Example]:
        """Read, validate, filter, split and cap the rows of this source."""
        rows = read_rows(self.path, self.format, self.records)
        need_response = (self.response is not None or self.messages is not None) if require_response is None \
            else require_response
        examples, bad = [], []
        for i, row in enumerate(rows, 1):
            if self.where and not _row_matches(row, self.where):
                continue
            try:
                ex = self._example(row, i, need_response and not self.self_distill)
            except DataError as e:
                if self.on_bad_row == "skip":
                    bad.append(i)
                    continue
                raise DataError(f"{self.path}: row {i}: {e}") from None
            if self.hash_split is not None:
                lo, hi = self.hash_split
                if not lo <= stable_fraction(ex.prompt) < hi:
                    continue
            examples.append(ex)
        if bad:
            log.warning("%s: skipped %d malformed row(s) (on_bad_row=skip): rows %s", self.path, len(bad),
                        ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else ""))
        if not examples:
            raise DataError(f"{self.path}: no rows left for source '{self.name}' after where={self.where} "
                            f"and hash_split={self.hash_split}.")
        if self.limit is not None and len(examples) > self.limit:
            examples = subsample(examples, self.limit, f"{seed}:{self.name}")
        return examples

    def _field(self, row: Any, key: str, required: bool = True) -> str | None:
        if not isinstance(row, dict):
            raise DataError(f"expected an object with field '{key}', got {type(row).__name__}")
        if key not in row:
            if not required:
                return None
            raise DataError(f"missing field '{key}' (fields present: {sorted(row)})")
        value = row[key]
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise DataError(f"field '{key}' must be a string, got {type(value).__name__}")
        return value

    def _example(self, row: Any, i: int, need_response: bool) -> Example:
        if self.messages is not None:
            turns = row if self.messages == "." else (row.get(self.messages) if isinstance(row, dict) else None)
            if not isinstance(turns, list) or not turns:
                raise DataError(f"field '{self.messages}' must be a non-empty list of {{role, content}} turns")
            out = []
            for t in turns:
                if not isinstance(t, dict) or not isinstance(t.get("content"), str) or \
                        t.get("role") not in ("system", "user", "assistant"):
                    raise DataError(f"malformed turn {t!r}: need role in system/user/assistant and string content")
                out.append({"role": t["role"], "content": t["content"]})
            if self.system is not None and out[0]["role"] != "system":
                out.insert(0, {"role": "system", "content": self.system})
            if need_response and (out[-1]["role"] != "assistant" or not out[-1]["content"].strip()):
                raise DataError("conversation must end with a non-empty assistant turn")
            return Example(out, self.name, i)
        prompt = self._field(row, self.prompt)
        if self.strip_inst:
            prompt = strip_llama2_markup(prompt)
        if self.input:
            extra = self._field(row, self.input, required=False)
            if extra and extra.strip() and extra.strip().lower() not in ("<noinput>", "noinput", "no input"):
                prompt = f"{prompt.rstrip()}\n\n{extra.strip()}"
        if not prompt.strip():
            raise DataError(f"empty prompt in field '{self.prompt}'")
        msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
        user = self.template.format(prompt=prompt.strip()) if self.template else prompt.strip()
        msgs.append({"role": "user", "content": user})
        if self.response is not None:
            response = self._field(row, self.response, required=need_response)
            if response is not None and response.strip():
                msgs.append({"role": "assistant", "content": response.strip()})
            elif need_response:
                raise DataError(f"empty response in field '{self.response}'")
        return Example(msgs, self.name, i, raw_prompt=prompt.strip())


def _row_matches(row: Any, where: dict) -> bool:
    if not isinstance(row, dict):
        return False
    for key, allowed in where.items():
        allowed = allowed if isinstance(allowed, (list, tuple)) else [allowed]
        if row.get(key) not in allowed and str(row.get(key)) not in map(str, allowed):
            return False
    return True


# --------------------------------------------------------------------------- chat template + label masking
def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The text a model sees before it answers: the conversation up to the last assistant turn."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(tokenizer, messages, add_generation_prompt=True)


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the templated conversation into (text, is_loss) pieces; assistant turns carry the loss."""
    full = render(tokenizer, messages, add_generation_prompt=False)
    pieces, pos = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], add_generation_prompt=True)
        after = render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (after.startswith(before) and full.startswith(after) and len(before) >= pos):
            raise DataError(
                "the chat template does not render conversations prefix-stably, so the response tokens cannot be "
                "located; set model.chat_template to a template whose prompt is a prefix of prompt + response."
            )
        pieces.append((full[pos:len(before)], False))
        pieces.append((full[len(before):len(after)], True))
        pos = len(after)
    if pos < len(full):
        pieces.append((full[pos:], False))
    return [(t, loss) for t, loss in pieces if t]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated_prompt: bool = False
    truncated_response: bool = False


def encode_example(tokenizer, messages: list[dict], max_length: int, min_response_tokens: int = 16) -> Encoded:
    """Token ids and labels (-100 on everything that is not an assistant turn), truncated to max_length.

    Truncation never silently drops the response: the response tail is cut first; if the prompt alone leaves less
    than `min_response_tokens`, the prompt is cut from the left so that many response tokens survive.
    """
    ids, labels = [], []
    for text, is_loss in chat_segments(tokenizer, messages):
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(toks)
        labels.extend(toks if is_loss else [IGNORE_INDEX] * len(toks))
    if len(ids) <= max_length:
        return Encoded(ids, labels)
    first_loss = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    n_loss = sum(lab != IGNORE_INDEX for lab in labels)
    keep_loss = min(n_loss, min_response_tokens)
    truncated_prompt = False
    if first_loss > max_length - keep_loss:  # the prompt leaves too little room: cut it from the left
        cut = first_loss - (max_length - keep_loss)
        ids, labels = ids[cut:], labels[cut:]
        truncated_prompt = True
    return Encoded(ids[:max_length], labels[:max_length], truncated_prompt, True)


class EncodedDataset(Dataset):
    def __init__(self, items: list[Encoded]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(batch: list[Encoded], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training; padding has label -100 and attention 0."""
    n = max(len(b.input_ids) for b in batch)
    if pad_to_multiple_of > 1:
        n = int(math.ceil(n / pad_to_multiple_of) * pad_to_multiple_of)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b.input_ids)
        ids[i, :k] = torch.tensor(b.input_ids)
        labels[i, :k] = torch.tensor(b.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------- resumable, shardable sampler
class ResumableSampler(Sampler):
    """Seeded per-epoch shuffle, sharded over ranks, that can skip what a resumed run already consumed."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.n // self.world_size if self.world_size > 1 else self.n  # drop the ragged tail
        return order[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world_size > 1 else order

    def __iter__(self):
        idx = self._indices()[self.skip:]
        self.skip = 0
        return iter(idx)

    def __len__(self):
        return len(self._indices()) - self.skip


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning saves in checkpoints, so a mid-epoch resume continues where the
    interrupted run stopped (same batches, same order) instead of replaying the epoch's first batches.

    The position is the number of batches the training loop has *processed* (not fetched: Lightning prefetches).
    """

    def __init__(self, *args, consumed_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._consumed_fn = consumed_fn or (lambda: 0)

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_consumed": int(self._consumed_fn())}

    def load_state_dict(self, state: dict) -> None:
        epoch, done = int(state.get("epoch", 0)), int(state.get("batches_consumed", 0))
        if done >= len(self):  # saved at the very end of an epoch: the next one starts from scratch
            epoch, done = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = done * self.batch_size


# --------------------------------------------------------------------------- the Lightning datamodule
class SFTDataModule(pl.LightningDataModule):
    """Supervised fine-tuning data: one or more sources, mixed by weight, templated, prompt-masked."""

    def __init__(self, tokenizer, sources, num_samples: int | None = None, val_fraction: float = 0.05,
                 max_length: int = 512, min_response_tokens: int = 16, batch_size: int = 8,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 self_distill: dict | None = None, cache_dir: str | None = None, name: str = "data"):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
        if max_length < 8:
            raise ConfigError(f"data.max_length={max_length} is too small.")
        self.tokenizer, self.sources_cfg, self.num_samples = tokenizer, sources, num_samples
        self.val_fraction, self.max_length, self.min_response_tokens = val_fraction, max_length, min_response_tokens
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.name = num_workers, seed, name
        self.self_distill_cfg = dict(self_distill or {})
        self.cache_dir = cache_dir
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.train_set = self.val_set = None
        self.stats: dict[str, Any] = {}

    # -- building -------------------------------------------------------------------------------------------
    def prepare(self, model=None) -> "SFTDataModule":
        """Read, mix, split and encode everything (eagerly, before fit). `model` is needed for self_distill."""
        if self.train_set is not None:
            return self
        sources = {name: Source.from_config(cfg, name) for name, cfg in self.sources_cfg.items()}
        if not sources:
            raise ConfigError("data.sources is empty: name at least one file to read.")
        per_source = {name: src.load(self.seed) for name, src in sources.items()}
        for name, src in sources.items():
            if src.self_distill:
                per_source[name] = self._self_distill(src, per_source[name], model)
            elif per_source[name][0].response is None:
                raise ConfigError(
                    f"data source '{name}' ({src.path}) has prompts but no responses; set response: <field> or "
                    f"self_distill: true to generate responses with the model being trained."
                )
        per_source = self._apply_mix(sources, per_source)
        for name, exs in per_source.items():
            rng = random.Random(f"{self.seed}:split:{name}")
            order = list(range(len(exs)))
            rng.shuffle(order)
            n_val = int(round(self.val_fraction * len(exs))) if len(exs) > 1 else 0
            self.val_examples += [exs[i] for i in order[:n_val]]
            self.train_examples += [exs[i] for i in order[n_val:]]
        self.train_set = self._encode(self.train_examples, "train")
        self.val_set = self._encode(self.val_examples, "val") if self.val_examples else None
        self.stats["sources"] = {name: len(exs) for name, exs in per_source.items()}
        log.info("data '%s': %d train / %d val examples from %s", self.name, len(self.train_set),
                 len(self.val_set or []), self.stats["sources"])
        return self

    def _apply_mix(self, sources: dict[str, Source], per_source: dict[str, list[Example]]):
        if self.num_samples is None:
            return per_source
        total_w = sum(src.weight for src in sources.values())
        if total_w <= 0:
            raise ConfigError("data source weights must sum to a positive number.")
        out = {}
        for name, src in sources.items():
            want = int(round(self.num_samples * src.weight / total_w))
            exs = per_source[name]
            if want > len(exs):
                log.warning("data source '%s' has %d rows, fewer than its share %d of num_samples=%d; using all",
                            name, len(exs), want, self.num_samples)
                want = len(exs)
            out[name] = subsample(exs, want, f"{self.seed}:mix:{name}")
        return out

    def _encode(self, examples: list[Example], split: str) -> EncodedDataset:
        items = [encode_example(self.tokenizer, ex.messages, self.max_length, self.min_response_tokens)
                 for ex in examples]
        n_resp = sum(it.truncated_response for it in items)
        n_prompt = sum(it.truncated_prompt for it in items)
        self.stats[f"{split}_truncated_response"] = n_resp
        self.stats[f"{split}_truncated_prompt"] = n_prompt
        if n_resp:
            log.warning("%s: %d of %d examples exceed max_length=%d and were truncated (%d of them also lost the "
                        "start of the prompt so that >= %d response tokens remain)", split, n_resp, len(items),
                        self.max_length, n_prompt, self.min_response_tokens)
        return EncodedDataset(items)

    def _self_distill(self, src: Source, examples: list[Example], model) -> list[Example]:
        from safety_units.generation import self_distill_responses

        if model is None:
            raise ConfigError(f"data source '{src.name}' sets self_distill: true, which needs the model to generate "
                              f"responses; call datamodule.prepare(model).")
        return self_distill_responses(model, self.tokenizer, examples, cache_dir=self.cache_dir,
                                      **self.self_distill_cfg)

    # -- lightning hooks ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None):
        self.prepare()

    def _collate(self, batch):
        return collate(batch, self.tokenizer.pad_token_id)

    def train_dataloader(self):
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableSampler(len(self.train_set), self.seed, True, rank, world)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                                   collate_fn=self._collate, num_workers=self.num_workers, drop_last=False,
                                   consumed_fn=self._batches_consumed)

    def _batches_consumed(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0

    def val_dataloader(self):
        if not self.val_set:
            return []
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableSampler(len(self.val_set), self.seed, False, rank, world)
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, sampler=sampler,
                          collate_fn=self._collate, num_workers=self.num_workers)

    def prompts(self) -> list[str]:
        return [ex.prompt for ex in self.train_examples + self.val_examples]


def build_datamodule(data_cfg, tokenizer, cache_dir: str | None = None) -> SFTDataModule:
    from safety_units.config import instantiate

    return instantiate(data_cfg, "data", tokenizer=tokenizer, cache_dir=cache_dir, _recursive_=False)
