"""scoring=contrast (attribution.contrast): the activation shift against the base model, and the checks on that
base model (attribution.scorer.ReferenceScorer)."""

import copy

import pytest
import torch
from planted import attribute_cfg, safety_batches
from planted import planted_dirs  # noqa: F401  (a fixture)

from safety_units.attribution.scorer import ScoringRun
from safety_units.attribution.contrast import ContrastScorer
from safety_units.attribution.pipeline import run_attribution
from safety_units.units.groups import resolve_units
from safety_units.utils.errors import ConfigError


def test_contrast_scores_exactly_the_unit_whose_activation_moved(tiny, tmp_path):
    """The base model differs in one layer-1 MLP unit's gate row: only that unit's activation moves (layer 1's
    attention runs before its MLP), so only it scores, by |mean shift| * ||W_out[:, j]||."""
    model, base = tiny.model, copy.deepcopy(tiny.model)
    with torch.no_grad():
        base.model.layers[1].mlp.gate_proj.weight[5] += 1.0
    batches = safety_batches(tiny.tokenizer, tmp_path)
    run = ScoringRun(model, resolve_units(model), built={"safety": batches, "utility": batches[:1]},
                     reference=base, ref_groups=resolve_units(base))
    safety, utility = ContrastScorer("contrast").safety(run), ContrastScorer("contrast").utility(run)
    for scores in (safety, utility):
        assert float(scores["mlp.1"][5]) > 0 and int((scores["mlp.1"] > 0).sum()) == 1
        assert all(float(v.abs().sum()) == 0.0 for k, v in scores.items() if k != "mlp.1")
    assert safety["mlp.1"][5] != utility["mlp.1"][5]  # each side reads its own set
    assert next(base.parameters()).device.type == "cpu"  # the base model leaves the device after its pass


def test_contrast_reference_must_be_a_different_model_of_the_same_shape(planted_dirs):
    root, dirs = planted_dirs
    with pytest.raises(ConfigError, match="scoring.reference: .*num_layers"):
        run_attribution(attribute_cfg(root, dirs, "scoring=contrast", "model@scoring.reference=tiny",
                                      "scoring.reference.num_layers=3"))
    with pytest.raises(ConfigError, match="scoring.reference: .*units"):
        run_attribution(attribute_cfg(root, dirs, "scoring=contrast", "model@scoring.reference=tiny",
                                      "scoring.reference.intermediate_size=64"))
    with pytest.raises(ConfigError, match="scoring.reference_path has the same weights"):
        run_attribution(attribute_cfg(root, dirs, "scoring=contrast", f"scoring.reference_path={dirs['aligned']}"))
    with pytest.raises(ConfigError, match="scoring.reference_path=.*not a directory"):
        run_attribution(attribute_cfg(root, dirs, "scoring=contrast", f"scoring.reference_path={root / 'nope'}"))
    with pytest.raises(ConfigError, match="same weights .* every delta score would be 0"):
        run_attribution(attribute_cfg(root, dirs, "scoring=delta", f"scoring.reference_path={dirs['aligned']}"))
