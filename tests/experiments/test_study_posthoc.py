"""The runner's `posthoc` stages (safety_units.experiments.study.posthoc): a post-hoc defense applied to a model that
was already fine-tuned, its update measured from the aligned model; a defense of another stage is refused."""

import copy

import pytest
import torch

from safety_units.defenses.posthoc import target_weights, update_norm
from safety_units.experiments.study.posthoc import apply_posthoc
from safety_units.models.loading import LoadedModel
from safety_units.utils.config import compose_config
from safety_units.utils.errors import ConfigError


def test_a_posthoc_stage_edits_the_fine_tuned_copy_and_records_its_drift(tiny, tokenizer):
    aligned = copy.deepcopy(tiny.model)
    tuned = LoadedModel(copy.deepcopy(tiny.model), tokenizer, "tuned")
    with torch.no_grad():
        for m in target_weights(tuned.model).values():
            m.weight.add_(0.01 * torch.randn_like(m.weight))
    before = update_norm(tuned.model, aligned)
    cfg = compose_config("train", ["~experiment", "defense=shrink", f"defense.norm={before / 2}"])
    record = apply_posthoc(cfg.defense, tuned, aligned, "post_x")
    assert record["defense"]["report"]["scale"] == pytest.approx(0.5)
    assert record["delta_norm"] == pytest.approx(before / 2) and record["train_seconds"] >= 0
    with pytest.raises(ConfigError, match="not a post-hoc defense"):
        apply_posthoc(compose_config("train", ["~experiment", "defense=lisa"]).defense, tuned, aligned, "post_y")
