"""What a defense is (`defense=` config group): a `Defense` built from its config's `_target_`, and the hooks
training.fit calls on it. The base class is `defense=none`: every hook does nothing.

A defense config names its class and keeps its settings as keyword arguments of it:

    _target_: safety_units.defenses.lisa.Lisa
    name: lisa            # every defense: its name (in the run's summary) and
    stage: finetune       # when it acts: none | align | finetune | post (STAGES)
    rho: 1.0              # ... the class's own settings

The hooks, in the order fit calls them: `extra_sources` (data to add to the fine-tuning mix), `check_run` (refuse a
run config the defense cannot work with), `training_objective` (a loss that replaces the plain language-modelling
loss), `callbacks` (Lightning callbacks that run before the export, e.g. a post-hoc edit of the weights) and `summary`
(what the run records). Adding a defense is one module with a subclass and one conf/defense/*.yaml.
"""

from __future__ import annotations

import random

import torch
from omegaconf import DictConfig, OmegaConf

from safety_units.data.chat import collate, encode_example
from safety_units.data.sources import Source
from safety_units.utils.config import instantiate
from safety_units.utils.errors import ConfigError

STAGES = ("none", "align", "finetune", "post")


class Defense:
    """No defense (`defense=none`), and the interface every defense implements by overriding some hooks."""

    def __init__(self, name: str = "none", stage: str = "none"):
        if stage not in STAGES:
            raise ConfigError(f"defense.stage must be one of {STAGES}, got {stage!r} (defense={name}).")
        self.name, self.stage = name, stage

    def extra_sources(self, data: DictConfig) -> dict[str, dict]:
        """Data sources to add to data.sources before the datamodule is built ({key: source config})."""
        return {}

    def check_run(self, cfg: DictConfig) -> None:
        """Raise a ConfigError when the run config (freeze=, ckpt_path, ...) contradicts this defense."""

    def training_objective(self, tokenizer, data: DictConfig, seed: int):
        """An object with `loss(module, batch) -> Tensor` (and optionally `last_terms`, logged each step) that
        replaces the plain language-modelling loss; None keeps the run's objective=."""
        return None

    def callbacks(self, tokenizer) -> list:
        """Lightning callbacks of this defense; they run before the export (FinalizeRun)."""
        return []

    def summary(self) -> dict | None:
        """What the run's summary records under `defense` (None: nothing, for stage none)."""
        return None if self.stage == "none" else {"name": self.name, "stage": self.stage}


def build_defense(cfg) -> Defense:
    """The Defense of a `defense` config (None: no defense). Nested settings (data sources, SafeLoRA's base model
    config) reach the class as plain dicts, not instantiated: the defense decides when to load them."""
    if cfg is None:
        return Defense()
    if "_target_" not in cfg:
        raise ConfigError(f"defense (name: {cfg.get('name')!r}) has no _target_: a defense config names the class "
                          f"that builds it, e.g. `_target_: safety_units.defenses.base.Defense` (see conf/defense/).")
    if "tune" in cfg:  # the defense benchmark's grid (experiments/defense_bench/tuning.py), not an argument
        whole = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        cfg = {k: v for k, v in whole.items() if k != "tune"}
    defense = instantiate(cfg, "defense", _recursive_=False, _convert_="all")
    if not isinstance(defense, Defense):
        raise ConfigError(f"defense._target_ {cfg['_target_']!r} built a {type(defense).__name__}, not a "
                          f"safety_units.defenses.base.Defense.")
    return defense


def trainable_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class BatchStream:
    """Endless seeded batches of one data source, encoded like the training data (for a defense's second set:
    Booster's harmful pairs, Lisa's alignment pairs)."""

    def __init__(self, sources: DictConfig | dict, tokenizer, batch_size: int, max_length: int, seed: int,
                 where: str):
        if not sources:
            raise ConfigError(f"{where} is empty: this defense needs a data source.")
        examples = []
        for name, cfg in (OmegaConf.to_container(sources, resolve=True) if isinstance(sources, DictConfig)
                          else sources).items():
            src = Source.from_config(cfg, name)
            examples += [ex for ex in src.load(seed) if ex.response is not None]
        if not examples:
            raise ConfigError(f"{where}: the sources hold no (prompt, response) pairs.")
        self.items = [encode_example(tokenizer, ex.messages, max_length) for ex in examples]
        self.pad_id = tokenizer.pad_token_id
        self.batch_size, self.rng = batch_size, random.Random(f"{seed}:{where}")
        self.order: list[int] = []

    def __len__(self) -> int:
        return len(self.items)

    def next(self, device) -> dict[str, torch.Tensor]:
        if len(self.order) < self.batch_size:
            more = list(range(len(self.items)))
            self.rng.shuffle(more)
            self.order += more
        idx, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return {k: v.to(device) for k, v in collate([self.items[i] for i in idx], self.pad_id).items()}
