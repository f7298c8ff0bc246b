"""What every scorer of the `scoring` config group is: a `Scorer` gives each unit a safety and a utility score.

A conf/scoring/<name>.yaml names its scorer class with `_target_`; its other keys are the class's arguments
(`method` is the name the run name, the unit map's metadata and the attribution cache record). `build_scorer` makes
the scorer and `attribution.pipeline.attribute` calls `scorer.safety(run)` and `scorer.utility(run)` on a
`ScoringRun`: the model, its units and the calibration batches. Adding a scorer is one module with a Scorer subclass
and one YAML. A `ReferenceScorer` also reads the base model the attributed one was trained from (contrast, delta).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from safety_units.attribution.scoring import activation_scores, check_tokens
from safety_units.models.loading import LoadedModel, load_hf
from safety_units.units.groups import UnitGroup, resolve_units, unit_counts
from safety_units.utils.config import instantiate
from safety_units.utils.errors import ConfigError, ModelError
from safety_units.utils.fingerprints import model_fingerprint

CALIBRATION_SETS = {  # what a scorer may read: calibration.<name>
    "safety": "harmful prompts with the model's refusals",
    "utility": "benign prompts with answers",
    "harmless": "a prompt set of harmless instructions (a data source, response: null)",
}


@dataclass
class ScoringRun:
    """What a scorer reads: the model being attributed and its units, the base model of a ReferenceScorer, the
    calibration batches (built by `load` on first use) and where a resumable scorer keeps its state. A scorer adds
    what the unit map's metadata should record to `metadata`."""
    model: torch.nn.Module
    groups: list[UnitGroup]
    names: dict | None = None                 # units.names (decoder_layers(model, names): the blocks)
    load: Callable[[str], list[dict]] | None = None  # calibration set name -> its batches
    built: dict[str, list[dict]] = field(default_factory=dict)  # the batches built so far (or given), by set
    reference: torch.nn.Module | None = None  # a ReferenceScorer's base model and its units
    ref_groups: list[UnitGroup] | None = None
    state_dir: Path | None = None
    metadata: dict = field(default_factory=dict)
    loading_s: float = 0.0                    # seconds spent building batches (not counted as scoring time)

    def batches(self, which: str) -> list[dict]:
        """The batches of calibration.<which>: safety and utility with responses as labels, harmless prompt-only."""
        if which not in self.built:
            if self.load is None:
                raise ConfigError(f"no {which} calibration batches were given to this scoring run.")
            t0 = time.perf_counter()
            self.built[which] = self.load(which)
            self.loading_s += time.perf_counter() - t0
        return self.built[which]


class Scorer:
    """One scorer's settings (the YAML's keys) and its two scores, each {unit group key: float tensor [units]}.

    `calibration_sets`: the calibration sets it reads (each must be configured; the unit map records them).
    `needs_reference`: it compares against a base model (a ReferenceScorer)."""
    calibration_sets = ("safety", "utility")
    needs_reference = False

    def __init__(self, method: str, tokens: str = "all", decision_tokens: int = 4):
        check_tokens(tokens, decision_tokens)
        self.method, self.tokens, self.decision_tokens = method, tokens, decision_tokens

    def desc(self, which: str) -> str:
        return f"{self.method} on {which}"

    def safety(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no safety score")

    def utility(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        """How much each unit writes on benign data: the `activation` score on the utility set (the utility of the
        scorers whose safety score reads something else: refusal_direction, delta, atp, mask)."""
        return activation_scores(run.model, run.groups, run.batches("utility"), "activation", tokens=self.tokens,
                                 decision_tokens=self.decision_tokens, desc=self.desc("utility"))


class ReferenceScorer(Scorer):
    """A scorer against the base model: `reference` (a model config, loaded in the attributed model's dtype) or
    `reference_path` (a local HF directory; when set it replaces `reference`)."""
    needs_reference = True

    def __init__(self, method: str, tokens: str = "all", decision_tokens: int = 4,
                 reference: DictConfig | None = None, reference_path: str | None = None):
        super().__init__(method, tokens, decision_tokens)
        self.reference, self.reference_path = reference, reference_path

    def load_reference(self, loaded: LoadedModel, model_dtype: str, names: dict | None = None) -> LoadedModel:
        """The base model, checked against the model being attributed (architecture, units, vocabulary)."""
        method, path = self.method, self.reference_path
        if path:
            if not Path(path).expanduser().is_dir():
                raise ConfigError(f"scoring.reference_path={path!r} is not a directory (a local Hugging Face model "
                                  f"directory of the base model).")
            try:
                ref = load_hf(str(path), dtype=model_dtype)
            except ModelError as e:
                raise ConfigError(f"scoring.reference_path: {e}") from None
            key = "scoring.reference_path"
        elif self.reference is not None:
            try:
                ref = instantiate(self.reference, "scoring.reference")
            except ModelError as e:
                raise ConfigError(f"scoring.reference: {e}") from None
            if not isinstance(ref, LoadedModel):
                raise ConfigError(f"scoring.reference._target_ must return a LoadedModel, got {type(ref).__name__}.")
            key = "scoring.reference"
        else:
            raise ConfigError(f"scoring={method} needs a base model: scoring.reference (a model config, e.g. "
                              f"model@scoring.reference=smollm2_135m) or scoring.reference_path=<local HF directory>.")
        ours, theirs = model_fingerprint(loaded.model), model_fingerprint(ref.model)
        for fld in ("model_type", "num_layers"):
            if ours[fld] != theirs[fld]:
                raise ConfigError(f"{key}: the reference model has {fld}={theirs[fld]!r}, the model being "
                                  f"attributed {ours[fld]!r}; {method} needs the same architecture (its base model).")
        have, want = unit_counts(resolve_units(ref.model, names)), unit_counts(resolve_units(loaded.model, names))
        if have != want:
            raise ConfigError(f"{key}: the reference model has units {have}, the model being attributed {want}; "
                              f"{method} needs the same unit counts per layer.")
        if ref.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
            raise ConfigError(f"{key}: the reference model's tokenizer differs from the attributed model's; both must "
                              f"read the same token ids.")
        if _same_weights(loaded.model, ref.model):
            raise ConfigError(f"{key} has the same weights as the model being attributed, so every {method} score "
                              f"would be 0; give its base model.")
        return ref


@torch.no_grad()
def _same_weights(a, b) -> bool:
    """Every parameter equal (stops at the first difference; the fingerprint hashes only a few tensors)."""
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y.to(x.device, x.dtype))
                                      for x, y in zip(pa, pb))


def build_scorer(cfg: DictConfig | None) -> Scorer:
    """The scorer a `scoring` config names by `_target_`, called with the config's other keys. A nested `reference`
    model config is passed as a config, not loaded (scoring.reference_path may replace it)."""
    if cfg is None or "_target_" not in cfg:
        raise ConfigError("scoring needs a _target_: its scorer class, a safety_units.attribution.scorer.Scorer "
                          "(e.g. _target_: safety_units.attribution.wifv.WifvScorer; see conf/scoring/*.yaml).")
    scorer = instantiate(cfg, "scoring", _recursive_=False)
    if not isinstance(scorer, Scorer):
        raise ConfigError(f"scoring._target_={cfg._target_!r} must be a safety_units.attribution.scorer.Scorer "
                          f"subclass, got {type(scorer).__name__}.")
    return scorer
