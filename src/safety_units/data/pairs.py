"""Data for objective=dpo and objective=unlearning (data=preference, data=unlearning): rows with a role, and the
starting model's log-probability of each row's response (the frozen reference), computed once before training.

A source names, beside its usual keys (safety_units.data.sources), how its rows are built:
* data=preference, `rejected:` -- `own`: the file's response is chosen and the model's own answer (self-distilled
  before training; from `self_distill.teacher` when set, e.g. the shipped model) is rejected; `refusal`: the file's
  response is chosen and one of `refusals` (picked by the prompt's hash) is rejected.
* data=unlearning, `role:` -- `forget`: the model's own answers to the source's prompts, to unlearn; `retain`: the
  file's (prompt, response) pairs, kept by the retain loss.
The three objectives then see the same prompts: SFT (data=mix), DPO and unlearning all read the refusal set's
prompts and the same benign instructions.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from safety_units.data.chat import Encoded, collate, encode_example
from safety_units.data.datamodule import EncodedDataset, SFTDataModule
from safety_units.utils.errors import ConfigError
from safety_units.data.generation import self_distill_responses
from safety_units.models.loading import resolve_device
from safety_units.models.forward import eval_mode
from safety_units.utils.ranks import RankedLogger
from safety_units.data.sources import Example, Source

log = RankedLogger(__name__)

KINDS = {"preference": ("rejected", ("own", "refusal")), "unlearning": ("role", ("forget", "retain"))}
ROW_KEYS = tuple(key for key, _ in KINDS.values())  # per-source keys of pair data that Source itself does not know


@dataclass
class RowItem:
    """One training item: its rows (a chosen/rejected pair, or one forget / retain row) and their metadata."""
    rows: list[Encoded]
    forget: list[int]
    ref: list[float] | None = None


def with_response(ex: Example, response: str) -> Example:
    msgs = ex.messages[:-1] if ex.messages[-1]["role"] == "assistant" else ex.messages
    return Example(msgs + [{"role": "assistant", "content": response}], ex.source, ex.row, ex.raw_prompt)


def collate_rows(items: list[RowItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Every item's rows in order (a pair: chosen, rejected), with `forget` and `ref_logps` per row."""
    rows = [r for it in items for r in it.rows]
    batch = collate(rows, pad_id)
    batch["forget"] = torch.tensor([f for it in items for f in it.forget], dtype=torch.long)
    batch["ref_logps"] = torch.tensor([x for it in items for x in (it.ref or [0.0] * len(it.rows))],
                                      dtype=torch.float32)
    return batch


@torch.no_grad()
def reference_logps(model, items: list[RowItem], pad_id: int, batch_size: int = 8) -> None:
    """Fill each item's `ref` with the model's summed response log-probabilities (the frozen reference)."""
    from safety_units.models.objectives import sequence_logps  # here: objectives imports models' heavy forward helpers

    device = resolve_device("auto")
    before = next(model.parameters()).device
    model.to(device)
    try:
        with eval_mode(model):
            for b in range(0, len(items), batch_size):
                part = items[b:b + batch_size]
                batch = {k: v.to(device) for k, v in collate_rows(part, pad_id).items()}
                logp = sequence_logps(model, batch).float().cpu().tolist()
                for it in part:
                    it.ref, logp = logp[:len(it.rows)], logp[len(it.rows):]
    finally:
        model.to(before)


class PairDataModule(SFTDataModule):
    """SFTDataModule's sources, mixing, splits, truncation and resumable loader, with items of several rows."""

    def __init__(self, tokenizer, sources, kind: str = "preference", refusals: list[str] | None = None,
                 reference_batch_size: int = 8, **kw):
        if kind not in KINDS:
            raise ConfigError(f"data.kind must be one of {sorted(KINDS)}, got {kind!r}.")
        self.kind, self.refusals = kind, list(refusals or [])
        self.reference_batch_size = int(reference_batch_size)
        key, allowed = KINDS[kind]
        plain = OmegaConf.to_container(sources, resolve=True) if isinstance(sources, DictConfig) else dict(sources)
        self.row_spec = {}
        for name, cfg in plain.items():
            value = cfg.pop(key, None)
            if value not in allowed:
                raise ConfigError(f"data.sources.{name}.{key} must be one of {allowed} for data.kind={kind}, "
                                  f"got {value!r}.")
            self.row_spec[name] = value
        if kind == "preference" and "refusal" in self.row_spec.values() and not self.refusals:
            raise ConfigError("data.refusals is empty: sources with `rejected: refusal` need refusal texts.")
        super().__init__(tokenizer, plain, **kw)

    def prepare(self, model=None) -> PairDataModule:
        if self.train_set is not None:
            return self
        if model is None:
            raise ConfigError(f"data={self.kind} needs the starting model (its own answers and the reference "
                              f"log-probabilities); call datamodule.prepare(model).")
        sources = {name: Source.from_config(cfg, name) for name, cfg in self.sources_cfg.items()}
        # a source whose own responses are used (chosen, retained) needs them: a row without one is malformed
        # (on_bad_row: skip drops it, error names it); self-distilled sources take the model's answers instead
        per_source = self._apply_mix(sources, {
            name: src.load(self.seed, require_response=self.row_spec[name] in ("own", "refusal", "retain"))
            for name, src in sources.items()})
        items: dict[str, list[tuple[Example, list[Example], list[int]]]] = {}
        for name, exs in per_source.items():
            spec = self.row_spec[name]
            if spec in ("own", "forget"):
                own = {ex.prompt: ex for ex in self._self_distill(sources[name], exs, model)}
                exs = [ex for ex in exs if ex.prompt in own]  # prompts whose own answer came out empty: dropped
            if spec in ("own", "refusal", "retain") and any(ex.response is None for ex in exs):
                raise ConfigError(f"data source '{name}' ({sources[name].path}) needs responses: set response: "
                                  f"<field>.")
            rows = []
            for ex in exs:
                if spec == "own":
                    rows.append((ex, [ex, own[ex.prompt]], [0, 0]))
                elif spec == "refusal":
                    pick = int(hashlib.sha256(ex.prompt.encode()).hexdigest(), 16) % len(self.refusals)
                    rows.append((ex, [ex, with_response(ex, self.refusals[pick])], [0, 0]))
                elif spec == "forget":
                    rows.append((own[ex.prompt], [own[ex.prompt]], [1]))
                else:
                    rows.append((ex, [ex], [0]))
            items[name] = rows
        train, val = [], []
        for name, rows in items.items():
            order = list(range(len(rows)))
            random.Random(f"{self.seed}:split:{name}").shuffle(order)
            n_val = int(round(self.val_fraction * len(rows))) if len(rows) > 1 else 0
            val += [rows[i] for i in order[:n_val]]
            train += [rows[i] for i in order[n_val:]]
        self.train_examples, self.val_examples = [r[0] for r in train], [r[0] for r in val]
        self.train_set = self._encode_rows(train, "train", model)
        self.val_set = self._encode_rows(val, "val", model) if val else None
        self.stats["sources"] = {name: len(rows) for name, rows in items.items()}
        self.stats["rows"] = {name: self.row_spec[name] for name in items}
        log.info("data '%s' (%s): %d train / %d val items from %s", self.name, self.kind, len(self.train_set),
                 len(self.val_set or []), self.stats["sources"])
        return self

    def _encode_rows(self, rows, split: str, model) -> EncodedDataset:
        items = [RowItem([encode_example(self.tokenizer, ex.messages, self.max_length, self.min_response_tokens)
                          for ex in exs], forget) for _, exs, forget in rows]
        self.stats[f"{split}_truncated_response"] = sum(r.truncated_response for it in items for r in it.rows)
        reference_logps(model, items, self.tokenizer.pad_token_id, self.reference_batch_size)
        return EncodedDataset(items)

    def _self_distill(self, src: Source, examples: list[Example], model) -> list[Example]:
        settings = dict(self.self_distill_cfg)
        teacher_cfg = settings.pop("teacher", None)
        teacher = self._teacher(teacher_cfg, model) if teacher_cfg is not None else model
        prompts = [Example([m for m in ex.messages if m["role"] != "assistant"], ex.source, ex.row, ex.raw_prompt)
                   for ex in examples]
        return self_distill_responses(teacher, self.tokenizer, prompts, cache_dir=self.cache_dir, **settings)

    def _collate(self, batch):
        return collate_rows(batch, self.tokenizer.pad_token_id)
