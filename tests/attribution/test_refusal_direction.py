"""scoring=refusal_direction (attribution.refusal_direction): units that write along the difference-of-means
refusal direction at the decision position."""

import json

import pytest
from planted import attribute_cfg
from planted import planted_dirs  # noqa: F401  (a fixture)

from safety_units.attribution.pipeline import run_attribution
from safety_units.attribution.refusal_direction import RefusalDirectionScorer
from safety_units.utils.errors import ConfigError


def test_refusal_direction_records_its_direction_norms_and_needs_harmless_prompts(planted_dirs):
    root, dirs = planted_dirs
    run_attribution(attribute_cfg(root, dirs, "scoring=refusal_direction"))
    meta = json.loads((root / "run" / "unit_map.json").read_text())["metadata"]
    norms = meta["refusal_direction_norms"]
    assert len(norms) == 2 and norms[1] > norms[0] > 0  # the planted unit adds its write to block 1's output
    assert set(meta["calibration"]) == {"safety", "utility", "harmless"} == set(RefusalDirectionScorer.calibration_sets)
    with pytest.raises(ConfigError, match="scoring=refusal_direction needs calibration.harmless"):
        run_attribution(attribute_cfg(root, dirs, "scoring=refusal_direction", "calibration.harmless=null"))
