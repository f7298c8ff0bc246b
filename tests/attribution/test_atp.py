"""scoring=atp (attribution.atp): attribution patching of each unit toward its harmless mean."""

import pytest
import torch
from planted import SORRY, attribute_cfg, sorry_refusals, tiny_cfg
from planted import planted_dirs  # noqa: F401  (a fixture)

from safety_units.attribution.atp import AtpScorer
from safety_units.attribution.pipeline import attribute, run_attribution
from safety_units.models.loading import load_hf
from safety_units.units.unit_map import UnitMap
from safety_units.utils.errors import ConfigError


def test_atp_needs_harmless_prompts_and_a_known_metric(tiny, tmp_path):
    with pytest.raises(ConfigError, match="scoring=atp needs calibration.harmless"):
        attribute(tiny, tiny_cfg(tmp_path, "scoring=atp", "calibration.harmless=null"), device="cpu")
    with pytest.raises(ConfigError, match="scoring.metric must be one of"):
        attribute(tiny, tiny_cfg(tmp_path, "scoring=atp", "scoring.metric=logits"), device="cpu")
    with pytest.raises(ConfigError, match="scoring.decision_tokens"):
        AtpScorer("atp", decision_tokens=-1)


@pytest.mark.parametrize("planted_dirs", [SORRY], indirect=True)
def test_with_heads_as_units_atp_ranks_the_planted_marker_head_first(planted_dirs):
    """units.heads=true on the planted model (refusals that start with the planted token): layer 0's head 0 is the
    only head that carries the marker into the residual stream, where the planted MLP unit reads it."""
    root, dirs = planted_dirs
    out = run_attribution(attribute_cfg(root, dirs, "scoring=atp", "units.heads=true", "scoring.decision_tokens=0",
                                        f"calibration.safety.path={sorry_refusals(root)}"))
    um = UnitMap.load(out["unit_map"], model=load_hf(str(dirs["aligned"])).model)
    heads = torch.cat([um.safety[f"head.{layer}"] for layer in range(2)])
    assert int(heads.argmax()) == 0, heads
