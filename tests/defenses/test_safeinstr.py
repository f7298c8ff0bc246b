"""defense=safeinstr (safety_units.defenses.safeinstr): its safety source joins the data at its share."""

import math

import pytest
from conftest import compose
from testkit import needs_hft_data

from safety_units.defenses.base import build_defense
from safety_units.defenses.safeinstr import SafeInstr
from safety_units.utils.errors import ConfigError


@needs_hft_data
def test_safeinstr_adds_its_share_of_safety_data():
    cfg = compose("train", ["~experiment", "data=task_mix", "data.num_samples=200", "defense=safeinstr"])
    defense = build_defense(cfg.defense)
    assert isinstance(defense, SafeInstr)
    extra = defense.extra_sources(cfg.data)
    total = sum(float(s.weight) for s in cfg.data.sources.values()) + extra["safeinstr"]["weight"]
    assert list(extra) == ["safeinstr"] and math.isclose(extra["safeinstr"]["weight"] / total, 0.03)
    assert extra["safeinstr"]["path"] == cfg.defense.source.path
    with pytest.raises(ConfigError, match="data.num_samples"):
        defense.extra_sources(compose("train", ["~experiment", "data=task_mix", "data.num_samples=null"]).data)
    with pytest.raises(ConfigError, match="defense.share"):
        SafeInstr(share=1.5, source=dict(cfg.defense.source))
