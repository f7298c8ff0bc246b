"""`data=synthetic`: safety fine-tuning data of the synthetic world, for each of Jain et al.'s three methods.

* `kind: sft`: unsafe inputs answered `refuse`, safe ones answered (objective unset / sft);
* `kind: preference` (objective=dpo): unsafe inputs prefer `refuse` over the task's answer, safe ones the answer
  over `refuse`;
* `kind: unlearning` (objective=unlearning): the task's answers to unsafe inputs are forgotten, the safe inputs'
  answers retained.
Canonical spellings only: the jailbreak variants stay unseen (safety_units.experiments.synthetic.world).
"""

from __future__ import annotations

import random

from safety_units.data.chat import collate
from safety_units.data.datamodule import EncodedDataset, SFTDataModule
from safety_units.utils.errors import ConfigError
from safety_units.data.pairs import RowItem, collate_rows, reference_logps
from safety_units.experiments.synthetic.model import encoded_rows
from safety_units.experiments.synthetic.world import OPERATORS, World, apply

KINDS = ("sft", "preference", "unlearning")


class SyntheticDataModule(SFTDataModule):
    def __init__(self, tokenizer, world: dict, kind: str = "sft", num_samples: int = 2000, unsafe_share: float = 0.5,
                 reference_batch_size: int = 64, **kw):
        if kind not in KINDS:
            raise ConfigError(f"data.kind must be one of {KINDS}, got {kind!r}.")
        if not 0 < unsafe_share < 1:
            raise ConfigError(f"data.unsafe_share must be in (0, 1), got {unsafe_share}.")
        if not world:
            raise ConfigError("data=synthetic needs model=synthetic (its data.world is the model's world).")
        kw.pop("sources", None)
        super().__init__(tokenizer, {}, num_samples=num_samples, **kw)
        self.world = World(**dict(world))
        self.kind = None if kind == "sft" else kind  # what objective= checks
        self.unsafe_share, self.reference_batch_size = float(unsafe_share), int(reference_batch_size)
        self.rows: list[dict] = []

    def answer(self, row: dict) -> str:
        xs = [int(t[1:]) for t in row["prompt"].split() if t.startswith("s")]
        return " ".join(f"s{x}" for x in apply(OPERATORS[row["op"]], xs, self.world.n_symbols))

    def prepare(self, model=None) -> SyntheticDataModule:
        if self.train_set is not None:
            return self
        rows = self.world.safety(int(self.num_samples), self.seed, self.unsafe_share)
        order = list(range(len(rows)))
        random.Random(f"{self.seed}:split").shuffle(order)
        n_val = int(round(self.val_fraction * len(rows)))
        split = {"val": [rows[i] for i in order[:n_val]], "train": [rows[i] for i in order[n_val:]]}
        self.rows = split["train"] + split["val"]
        sets = {}
        for name, part in split.items():
            if not part:
                sets[name] = None
                continue
            if self.kind is None:
                sets[name] = EncodedDataset(encoded_rows(self.tokenizer, part, self.max_length))
                continue
            if model is None:
                raise ConfigError(f"data=synthetic kind={self.kind} needs the starting model (reference "
                                  f"log-probabilities); call datamodule.prepare(model).")
            items = []
            for r in part:
                answer = self.answer(r)
                if self.kind == "preference":
                    first, second = ("refuse", answer) if r["unsafe"] else (answer, "refuse")
                    rows2 = [dict(r, response=first), dict(r, response=second)]
                    items.append(RowItem(encoded_rows(self.tokenizer, rows2, self.max_length), [0, 0]))
                else:
                    items.append(RowItem(encoded_rows(self.tokenizer, [dict(r, response=answer)], self.max_length),
                                         [int(r["unsafe"])]))
            reference_logps(model, items, self.tokenizer.pad_token_id, self.reference_batch_size)
            sets[name] = EncodedDataset(items)
        self.train_set, self.val_set = sets["train"], sets["val"]
        self.stats["sources"] = {"unsafe": sum(r["unsafe"] for r in rows), "safe": sum(not r["unsafe"] for r in rows)}
        self.stats["kind"] = self.kind or "sft"
        return self

    def _collate(self, batch):
        if self.kind is None:
            return collate(batch, self.tokenizer.pad_token_id)
        return collate_rows(batch, self.tokenizer.pad_token_id)

    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]
