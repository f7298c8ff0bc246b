"""The steering interface (the `steer` config group): a variant is the class its config's `_target_` names, a
`Steerer` that `fit`s itself to a model and returns the `SteeringHooks` to install; `steering(...)` installs them for
one block. Variants: `NoSteering` (steer=none, here), `ScansSteerer` (safety_units.steering.scans),
`RefusalAblationSteerer` (safety_units.steering.refusal_ablation). Those fitted on anchor prompts derive from
`AnchoredSteerer`, which caches what it fits per model fingerprint and settings under `<cache_dir>/steering/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from safety_units.steering.prompt_states import anchor_prompts
from safety_units.utils.config import instantiate
from safety_units.utils.errors import ConfigError
from safety_units.utils.fingerprints import fingerprint_key, model_fingerprint
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)


class SteeringHooks:
    """What a fitted steerer installs: `hooks()` registers its forward hooks and returns their handles; `summary()`,
    read when the steered block ends, says what was installed and what the hooks did."""

    def hooks(self) -> list:
        raise NotImplementedError

    def summary(self) -> dict:
        return {}


class Steerer:
    """A steering method. `method` is the name reports and eval_meta.json give it; `fit(model, tokenizer)` returns
    the SteeringHooks for that model (None: nothing to install). `active` is False only when it never steers."""

    method = "custom"
    active = True

    def __init__(self, method: str | None = None):
        if method is not None and method != self.method:  # the config's `method:` key must agree with its _target_
            raise ConfigError(f"steer.method={method!r} does not match steer._target_ "
                              f"({type(self).__module__}.{type(self).__qualname__} is method {self.method!r}).")

    def fit(self, model, tokenizer) -> SteeringHooks | None:
        raise NotImplementedError


class NoSteering(Steerer):
    """steer=none: generations are exactly those of the model."""

    method = "none"
    active = False

    def fit(self, model, tokenizer) -> None:
        return None


class AnchoredSteerer(Steerer):
    """A steerer fitted on the anchor prompts of its config (`anchor.harmful`, `anchor.harmless`; see
    conf/steer/_anchors.yaml). Subclasses give `fit_artifacts` (the fit) and `hooks_for` (the hooks from a fit);
    `install_settings` are the config keys that change only the hooks, not the fit (left out of the cache key)."""

    install_settings: tuple[str, ...] = ()

    def __init__(self, method: str | None = None, **settings):
        super().__init__(method)
        self.cfg = OmegaConf.create({"method": self.method, **settings})  # the steer config, less its _target_

    def fit_artifacts(self, model, tokenizer, prompts: dict[str, list[str]]) -> dict:
        raise NotImplementedError

    def hooks_for(self, model, tokenizer, art: dict) -> SteeringHooks:
        raise NotImplementedError

    def fit(self, model, tokenizer) -> SteeringHooks:
        return self.hooks_for(model, tokenizer, self.artifacts(model, tokenizer))

    def cache_path(self, model, prompts: dict[str, list[str]]) -> Path | None:
        if not self.cfg.get("cache_dir"):
            return None
        skip = ("_target_", "cache_dir", *self.install_settings)
        settings = {k: v for k, v in OmegaConf.to_container(self.cfg, resolve=True).items() if k not in skip}
        h = hashlib.sha256(json.dumps([settings, prompts], sort_keys=True).encode()).hexdigest()[:16]
        model_key = fingerprint_key(model_fingerprint(model))
        return Path(self.cfg.cache_dir) / "steering" / f"{self.method}-{model_key}-{h}.pt"

    def artifacts(self, model, tokenizer) -> dict:
        """The fitted artifacts for this model (from the cache, or fitted and cached)."""
        a = self.cfg.anchor
        seed = int(a.get("seed", 0))
        prompts = {"harmful": anchor_prompts(a.harmful, int(a.nsamples), seed, "steer.anchor.harmful"),
                   "harmless": anchor_prompts(a.harmless, int(a.nsamples), seed, "steer.anchor.harmless")}
        path = self.cache_path(model, prompts)
        if path is not None and path.is_file():
            log.info("steer=%s: fitted vectors from %s", self.method, path)
            return torch.load(path, weights_only=False)
        art = self.fit_artifacts(model, tokenizer, prompts)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(art, tmp)
            os.replace(tmp, path)
            log.info("steer=%s: fitted on %d harmful + %d harmless anchors, cached in %s", self.method,
                     len(prompts["harmful"]), len(prompts["harmless"]), path)
        return art


def build_steerer(cfg) -> Steerer:
    """The Steerer of a `steer` config (its `_target_` names the class); None: NoSteering; a Steerer: itself."""
    if cfg is None:
        return NoSteering()
    if isinstance(cfg, Steerer):
        return cfg
    if not isinstance(cfg, (Mapping, DictConfig)) or "_target_" not in cfg:
        raise ConfigError(f"steer needs a _target_ (a Steerer class, e.g. steer=none|scans|refusal_ablation from "
                          f"conf/steer/), got {cfg!r}.")
    steerer = instantiate(cfg, "steer", _convert_="all")
    if not isinstance(steerer, Steerer):
        raise ConfigError(f"steer._target_={cfg['_target_']!r} is not a Steerer (safety_units.steering.steerer), "
                          f"it made a {type(steerer).__name__}.")
    return steerer


def fitted(model, tokenizer, cfg) -> dict:
    """The fitted artifacts of an anchored steerer (a `steer` config or a Steerer) for this model (cached)."""
    steerer = build_steerer(cfg)
    if not isinstance(steerer, AnchoredSteerer):
        raise ConfigError(f"steer={steerer.method} fits nothing on anchors (only an AnchoredSteerer has artifacts).")
    return steerer.artifacts(model, tokenizer)


@contextlib.contextmanager
def steering(model, tokenizer, steerer):
    """Steer every forward pass inside the block by `steerer` (a Steerer, or a `steer` config it is built from);
    yields a dict that is filled with what was installed (method, blocks, threshold, ...) when the block ends.
    No model (saved completions only) or steer=none installs nothing."""
    steerer = build_steerer(steerer)
    info: dict = {"method": steerer.method}
    installer = steerer.fit(model, tokenizer) if model is not None else None
    if installer is None:
        yield info
        return
    handles = installer.hooks()
    try:
        yield info
    finally:
        for h in handles:
            h.remove()
        info.update(installer.summary())
