"""One model on one calibration set: the wifv, activation or snip scores that the drift monitor re-scores during
training and the cost benchmarks time (the other scorers, and both sets, are attribution.pipeline.attribute's)."""

from __future__ import annotations

import torch

from safety_units.attribution.scoring import activation_scores
from safety_units.attribution.snip import snip_scores
from safety_units.units.groups import UnitGroup
from safety_units.utils.errors import ConfigError

ONE_SET_METHODS = ("wifv", "activation", "snip")  # what score_units runs


def score_units(model, groups: list[UnitGroup], batches: list[dict], method: str, tokens: str = "all",
                progress: bool = True, desc: str = "", gradient_checkpointing: bool = True,
                decision_tokens: int = 4) -> dict[str, torch.Tensor]:
    """The scores of one model on one calibration set: wifv, activation or snip (the scorers that read nothing
    else; the others, and both sets, are attribution.pipeline.attribute's)."""
    if method not in ONE_SET_METHODS:
        raise ConfigError(f"score_units scores one model on one set with one of {ONE_SET_METHODS}, got {method!r} "
                          f"(use attribution.pipeline.attribute for the other scorers).")
    if method == "snip":
        return snip_scores(model, groups, batches, progress=progress, desc=desc or "snip",
                           gradient_checkpointing=gradient_checkpointing, tokens=tokens,
                           decision_tokens=decision_tokens)
    return activation_scores(model, groups, batches, method, tokens=tokens, decision_tokens=decision_tokens,
                             progress=progress, desc=desc or method)
