"""defense=random_prune (safety_units.defenses.random_prune): Antidote's per-row counts on entries drawn at random
(seeded), on LoRA factors and on full weights, without calibration data, and its config errors."""

import pytest
import torch
from conftest import compose
from defense_kit import CACHE, antidote_settings, with_lora

from safety_units.defenses.antidote import Antidote
from safety_units.defenses.base import build_defense
from safety_units.defenses.posthoc import target_weights
from safety_units.defenses.random_prune import RandomPrune
from safety_units.utils.errors import ConfigError


def pruned_entries(model, before):
    """{parameter: bool mask of the entries that changed}, over the parameters in `before`."""
    params = dict(model.named_parameters())
    return {n: params[n] != w for n, w in before.items()}


def lora_run(tiny, tokenizer, defense):
    model, start = with_lora(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    report = defense.apply(model, start, tokenizer, "cpu")
    return report, pruned_entries(model, before), model, start


def test_random_prune_matches_antidotes_per_row_counts_on_other_entries(tiny, tokenizer, tmp_path):
    from safety_units.models.loading import build_tiny

    ours, changed, model, start = lora_run(tiny, tokenizer, RandomPrune(dense_ratio=0.25, seed=0))
    wanda, wanda_changed, _, _ = lora_run(build_tiny(CACHE), tokenizer,
                                          Antidote(**{**antidote_settings(tmp_path), "dense_ratio": 0.25}))
    assert ours["per_row"] == wanda["per_row"] and ours["pruned"] == wanda["pruned"]
    assert ours["pruned_kinds"] == ["lora_A", "lora_B"] and ours["seed"] == 0 and "calibration_tokens" not in ours
    for key, mask in changed.items():  # A and B: random entries are non-zero, so every pruned entry changes
        assert (mask.sum(1) == ours["per_row"][key]).all(), key
        assert torch.equal(dict(model.named_parameters())[key][mask], torch.zeros(int(mask.sum())))
    assert any(not torch.equal(changed[k], wanda_changed[k]) for k in changed if "lora_A" in k)
    for n, m in target_weights(model).items():
        assert torch.equal(m.get_base_layer().weight, start[n])


def test_random_prune_is_seeded(tiny, tokenizer):
    from safety_units.models.loading import build_tiny

    _, first, _, _ = lora_run(tiny, tokenizer, RandomPrune(seed=3))
    _, again, _, _ = lora_run(build_tiny(CACHE), tokenizer, RandomPrune(seed=3))
    _, other, _, _ = lora_run(build_tiny(CACHE), tokenizer, RandomPrune(seed=4))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_random_prune_on_full_weights_resets_random_entries_to_the_aligned_weights(tiny):
    model = tiny.model
    targets = target_weights(model)
    start = {n: m.weight.detach().clone() for n, m in targets.items()}
    with torch.no_grad():
        for m in targets.values():
            m.weight.add_(0.01)  # every update entry non-zero
    trained = {n: m.weight.detach().clone() for n, m in targets.items()}
    report = RandomPrune(dense_ratio=0.1, granularity="matrix").apply(model, start, None, "cpu")
    assert report["pruned_kinds"] == ["update"] and report["trained"] == 14
    for n, m in targets.items():
        reset = m.weight != trained[n]
        assert int(reset.sum()) == report["pruned"][n] == -(-m.weight.numel() // 10)  # ceil(0.1 * numel)
        assert torch.equal(m.weight[reset], start[n][reset])
    assert report["removed_norm_share"] == pytest.approx(0.1 ** 0.5, rel=0.02)  # a uniform 10% of equal entries


def test_random_prune_config_builds_and_bad_settings_name_the_key():
    defense = build_defense(compose("train", ["defense=random_prune"]).defense)
    assert isinstance(defense, RandomPrune) and defense.stage == "post"
    assert (defense.dense_ratio, defense.granularity, defense.seed) == (0.1, "row", 0)
    for bad, match in [({"dense_ratio": 0}, "defense.dense_ratio"), ({"granularity": "all"}, "defense.granularity"),
                       ({"seed": 0.5}, "defense.seed"), ({"stage": "finetune"}, "defense.stage")]:
        with pytest.raises(ConfigError, match=match):
            RandomPrune(**bad)
