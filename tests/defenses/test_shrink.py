"""defense=shrink (safety_units.defenses.shrink): the matched-drift control scales the update to a target norm --
read from a benchmark stage's point.json -- in full weights and through LoRA's B, never growing it."""

import json

import pytest
import torch
from defense_kit import merged_delta, train_b

from safety_units.defenses.posthoc import target_weights, update_norm
from safety_units.defenses.shrink import Shrink
from safety_units.utils.errors import ConfigError


def test_shrink_scales_full_updates_to_the_norm_of_another_stage(tiny, tokenizer, tmp_path):
    import copy

    start_model = copy.deepcopy(tiny.model)
    start = {n: m.weight.detach().clone() for n, m in target_weights(tiny.model).items()}
    with torch.no_grad():
        for n, m in target_weights(tiny.model).items():
            m.weight.add_(0.01 * torch.randn_like(m.weight))
    before = update_norm(tiny.model, start_model)
    point = tmp_path / "point.json"
    point.write_text(json.dumps({"train": {"delta_norm": before / 4}}))
    report = Shrink(norm_of=str(point)).apply(tiny.model, start, tokenizer, torch.device("cpu"))
    assert report["scale"] == pytest.approx(0.25) and update_norm(tiny.model, start_model) == pytest.approx(before / 4)
    again = Shrink(norm=10 * before).apply(tiny.model, start, tokenizer, torch.device("cpu"))
    assert again["scale"] == 1.0  # never grows the update


def test_shrink_scales_lora_b_and_checks_its_settings(tiny, tokenizer, tmp_path):
    from safety_units.models.lora import LoraAdapter

    loaded = {n: m.weight.detach().clone() for n, m in target_weights(tiny.model).items()}
    model, _ = LoraAdapter(rank=4, alpha=8, dropout=0.0).wrap(tiny.model)
    train_b(model)
    full = merged_delta(model, loaded)
    Shrink(norm=0.5 * sum(float(d.pow(2).sum()) for d in full.values()) ** 0.5).apply(model, loaded, tokenizer,
                                                                                      torch.device("cpu"))
    after = merged_delta(model, loaded)
    assert all(torch.allclose(after[n], 0.5 * full[n], atol=1e-6) for n in full)
    with pytest.raises(ConfigError, match="not both"):
        Shrink(norm=1.0, norm_of="x.json")
    with pytest.raises(ConfigError, match="needs defense.norm"):
        Shrink().apply(model, loaded, tokenizer, torch.device("cpu"))
    with pytest.raises(ConfigError, match="does not exist"):
        Shrink(norm_of=str(tmp_path / "missing.json")).apply(model, loaded, tokenizer, torch.device("cpu"))
