"""defense=safeinstr (safety_units.defenses.safeinstr): its safety examples replace task examples, the harmful count
and the total staying what they are without the defense (through the real datamodule), and its config errors."""

import pytest
from conftest import compose
from omegaconf import open_dict
from testkit import needs_hft_data

from safety_units.defenses.base import build_defense
from safety_units.defenses.safeinstr import SafeInstr
from safety_units.utils.errors import ConfigError


def mixed_counts(tokenizer, *overrides):
    """The datamodule's examples per source for data=task_mix, with the defense's sources merged as fit does."""
    from safety_units.data.datamodule import build_datamodule

    cfg = compose("train", ["~experiment", "data=task_mix", *overrides])
    extra = build_defense(cfg.defense).extra_sources(cfg.data)
    with open_dict(cfg.data.sources):
        cfg.data.sources.update(extra)
    return build_datamodule(cfg.data, tokenizer).prepare().stats["sources"]


@needs_hft_data
@pytest.mark.parametrize("n, p, share, expect", [
    (96, 0.1, 0.03, {"task": 83, "harmful": 10, "safeinstr": 3}),  # weights renormalised: 9 harmful before the fix
    (50, 0.2, 0.1, {"task": 35, "harmful": 10, "safeinstr": 5}),
])
def test_safety_examples_replace_task_examples(tokenizer, n, p, share, expect):
    base = [f"data.num_samples={n}", f"data.harmful_share={p}"]
    without = {"task": expect["task"] + expect["safeinstr"], "harmful": expect["harmful"]}
    assert mixed_counts(tokenizer, *base) == without
    assert mixed_counts(tokenizer, *base, "defense=safeinstr", f"defense.share={share}") == expect


@needs_hft_data
def test_safeinstr_settings_and_errors_name_the_key():
    cfg = compose("train", ["~experiment", "data=task_mix", "data.num_samples=200", "defense=safeinstr"])
    defense = build_defense(cfg.defense)
    assert isinstance(defense, SafeInstr) and (defense.share, defense.replaces) == (0.03, "task")
    extra = defense.extra_sources(cfg.data)
    assert extra["safeinstr"]["path"] == cfg.defense.source.path and extra["safeinstr"]["weight"] == 6
    assert extra["harmful"]["path"] == cfg.data.sources.harmful.path  # the other settings kept, resolved
    with pytest.raises(ConfigError, match="data.num_samples"):
        defense.extra_sources(compose("train", ["~experiment", "data=task_mix", "data.num_samples=null"]).data)
    bad = compose("train", ["~experiment", "data=harmful_examples", "defense=safeinstr"])
    with pytest.raises(ConfigError, match="defense.replaces='task' is not a source .*pure_bad"):
        build_defense(bad.defense).extra_sources(bad.data)
    too_many = compose("train", ["~experiment", "data=task_mix", "data.num_samples=10", "data.harmful_share=0.9",
                                 "defense=safeinstr", "defense.share=0.5"])
    with pytest.raises(ConfigError, match="defense.share=0.5: 5 safety examples"):
        build_defense(too_many.defense).extra_sources(too_many.data)
    for settings, match in [({"share": 1.5}, "defense.share"), ({"replaces": ""}, "defense.replaces"),
                            ({"source": None}, "defense.source")]:
        with pytest.raises(ConfigError, match=match):
            SafeInstr(**{"source": dict(cfg.defense.source), **settings})
