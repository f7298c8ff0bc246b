"""Data for training: encoded datasets, a resumable sharded sampler, and the Lightning datamodule.

Examples come from sources (safety_units.data.sources: a file plus a field mapping); `SFTDataModule` combines them
(weights for mixing refusal pairs with benign data) and self-distils prompt-only ones.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from omegaconf import OmegaConf

from safety_units.data.chat import Encoded, collate, encode_example
from safety_units.utils.config import instantiate
from safety_units.utils.errors import ConfigError
from safety_units.data.generation import self_distill_responses
from safety_units.models.loading import load_model, resolve_device
from safety_units.utils.ranks import RankedLogger
from safety_units.data.sources import Example, Source, subsample

log = RankedLogger(__name__)


class EncodedDataset(Dataset):
    def __init__(self, items: list[Encoded]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


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
_TEACHERS: dict[str, object] = {}  # loaded self-distillation teachers, by resolved model config


class SFTDataModule(pl.LightningDataModule):
    """Supervised fine-tuning data: one or more sources, mixed by weight, templated, prompt-masked."""

    def __init__(self, tokenizer, sources, num_samples: int | None = None, val_fraction: float = 0.05,
                 max_length: int = 512, min_response_tokens: int = 16, batch_size: int = 8,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 self_distill: dict | None = None, cache_dir: str | None = None, name: str = "data",
                 harmful_share: float | None = None):
        """harmful_share: data=harmful_mix's p, which its sources' weights interpolate; kept in stats."""
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
        self._teacher_model = None  # data.self_distill.teacher, loaded on first use
        self.cache_dir = cache_dir
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.train_set = self.val_set = None
        self.stats: dict[str, Any] = {} if harmful_share is None else {"harmful_share": float(harmful_share)}

    # -- building -------------------------------------------------------------------------------------------
    def prepare(self, model=None) -> SFTDataModule:
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
        settings = dict(self.self_distill_cfg)
        teacher_cfg = settings.pop("teacher", None)
        if teacher_cfg is not None:  # another model answers (e.g. the shipped model's compliant answers)
            model = self._teacher(teacher_cfg, model)
        elif model is None:
            raise ConfigError(f"data source '{src.name}' sets self_distill: true, which needs the model to generate "
                              f"responses; call datamodule.prepare(model).")
        return self_distill_responses(model, self.tokenizer, examples, cache_dir=self.cache_dir, **settings)

    def _teacher(self, teacher_cfg, student):
        """data.self_distill.teacher: a model config (any `model` group entry), loaded once, same vocabulary."""
        if self._teacher_model is None:
            key = OmegaConf.to_yaml(teacher_cfg, resolve=True)
            if key not in _TEACHERS:  # a study builds dozens of datamodules with one teacher: load it once
                _TEACHERS[key] = load_model(teacher_cfg).model.to(resolve_device("auto"))  # answers on the GPU if any
            teacher = _TEACHERS[key]
            if student is not None and teacher.get_input_embeddings().num_embeddings != \
                    student.get_input_embeddings().num_embeddings:
                raise ConfigError(f"data.self_distill.teacher ({teacher_cfg.get('_target_')}) has another vocabulary "
                                  f"than the trained model; the teacher must share its tokenizer.")
            self._teacher_model = teacher
        return self._teacher_model

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
    return instantiate(data_cfg, "data", tokenizer=tokenizer, cache_dir=cache_dir, _recursive_=False)
