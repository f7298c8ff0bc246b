"""A runner stage of kind `posthoc` (the defense benchmark's SafeLoRA, Antidote, random pruning and matched-drift
cells): a post-hoc defense applied to an already fine-tuned model, its update measured from the aligned model."""

from __future__ import annotations

import time

from safety_units.defenses.base import build_defense
from safety_units.defenses.posthoc import PostHocDefense, target_weights, update_norm
from safety_units.models.loading import LoadedModel
from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)


def apply_posthoc(defense_cfg, tuned: LoadedModel, aligned, where: str) -> dict:
    """Apply the post-hoc defense of `defense_cfg` to `tuned` in place, W_aligned taken from the model `aligned`;
    returns what the stage records: the defense's report, its seconds and the defended model's ||dW||."""
    defense = build_defense(defense_cfg)
    if not isinstance(defense, PostHocDefense):
        raise ConfigError(f"stage {where}: defense={defense.name} is not a post-hoc defense (stage: post).")
    start = {n: m.weight.detach().to("cpu", copy=True) for n, m in target_weights(aligned).items()}
    device = next(tuned.model.parameters()).device
    t0 = time.time()
    report = defense.apply(tuned.model, start, tuned.tokenizer, device)
    seconds = time.time() - t0
    log.info(defense.summary_line(report))
    return {"defense": {"name": defense.name, "stage": defense.stage, "report": report}, "train_seconds": seconds,
            "delta_norm": update_norm(tuned.model, aligned)}
