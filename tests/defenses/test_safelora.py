"""defense=safelora (safety_units.defenses.safelora): the projection onto the alignment subspace against IBM/SafeLoRA's
code, select=number with num_layers auto, the edit on a tiny Llama with LoRA against the pure function, and its config
errors."""

import pytest
import torch
from conftest import compose
from defense_kit import CACHE, TINY_BASE, merged_delta, with_lora

from safety_units.defenses.base import build_defense
from safety_units.defenses.posthoc import target_weights
from safety_units.defenses.safelora import SafeLoRA, alignment_matrix, resolve_num_layers, safelora_project
from safety_units.utils.errors import ConfigError


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_safelora_keeps_an_update_inside_the_alignment_subspace_and_removes_an_orthogonal_one():
    g = gen(0)
    base = torch.randn(8, 6, generator=g)
    v = torch.zeros(8, 6)
    v[:3] = torch.randn(3, 6, generator=g)  # V's column space: span(e0, e1, e2)
    aligned = base + v
    u = torch.linalg.svd(v).U[:, :1]  # an eigenvector of V V^T: C dW = lambda dW
    inside = u @ torch.randn(1, 6, generator=g)
    outside = torch.zeros(8, 6)
    outside[3:] = torch.randn(5, 6, generator=g)  # V^T dW = 0
    delta = {"in": inside, "out": outside}
    new, report = safelora_project(delta, {k: aligned for k in delta}, {k: base for k in delta}, threshold=0.5,
                                   select="threshold")
    assert report["num_layers_resolved"] is None
    assert report["cos"]["in"] == pytest.approx(1.0, abs=1e-6)
    assert report["cos"]["out"] == 0.0
    assert report["projected"] == ["out"] and report["n_projected"] == 1
    assert new["in"] is inside  # not projected: the same tensor
    assert torch.count_nonzero(new["out"]) == 0


def test_safelora_on_the_merged_update_equals_the_codes_projection_of_lora_b():
    # IBM/SafeLoRA projected_weighted: B <- P B with P = V V^T / ||V|| (get_aligned_matrix); dW = s B A.
    g = gen(1)
    base, aligned = torch.randn(10, 7, generator=g), torch.randn(10, 7, generator=g)
    b, a, s = torch.randn(10, 3, generator=g), torch.randn(3, 7, generator=g), 2.0
    vec = aligned - base
    p = torch.mm(vec, vec.t()) / torch.norm(vec)
    assert torch.allclose(alignment_matrix(aligned, base), p)
    cos_code = torch.nn.functional.cosine_similarity(torch.mm(torch.mm(p, b), a).reshape(1, -1),
                                                     torch.mm(b, a).reshape(1, -1)).item()
    new, report = safelora_project({"w": s * b @ a}, {"w": aligned}, {"w": base}, threshold=1.0, select="threshold")
    assert report["cos"]["w"] == pytest.approx(cos_code, abs=1e-6)
    assert torch.allclose(new["w"], s * torch.mm(p, b) @ a, atol=1e-5)


def test_safelora_select_number_projects_exactly_num_layers_lowest_cos_matrices():
    g = gen(2)
    delta, aligned, base = {}, {}, {}
    for i in range(6):
        base[f"m{i}"], aligned[f"m{i}"] = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
        delta[f"m{i}"] = torch.randn(5, 4, generator=g)
    delta["m4"] = torch.zeros(5, 4)  # cos 0, tied with m5
    delta["m5"] = torch.zeros(5, 4)
    _, report = safelora_project(delta, aligned, base, select="number", num_layers=1)
    assert report["projected"] == ["m4"]  # a tie goes by order: exactly one
    _, report = safelora_project(delta, aligned, base, select="number", num_layers=4)
    lowest = sorted(delta, key=lambda n: report["cos"][n])[:4]
    assert report["n_projected"] == 4 and set(report["projected"]) == set(lowest)
    assert report["threshold"] == max(report["cos"][n] for n in lowest)
    with pytest.raises(ValueError, match="select"):
        safelora_project(delta, aligned, base, select="top")


def test_num_layers_auto_keeps_the_codes_share_of_10_in_64_adapted_matrices():
    # round(10 * n / 64), half up, at least 1: SmolLM2-135M's 210 matrices -> 33, Llama-2-7B's q/v 64 -> 10
    assert [resolve_num_layers("auto", n) for n in (1, 3, 14, 16, 64, 210, 224)] == [1, 1, 2, 3, 10, 33, 35]
    assert resolve_num_layers(7, 210) == 7
    with pytest.raises(ValueError, match="num_layers"):
        resolve_num_layers("all", 10)
    g = gen(6)
    delta = {f"m{i}": torch.randn(5, 4, generator=g) for i in range(14)}
    aligned = {n: torch.randn(5, 4, generator=g) for n in delta}
    base = {n: torch.randn(5, 4, generator=g) for n in delta}
    _, report = safelora_project(delta, aligned, base)  # the defaults: select=number, num_layers=auto
    lowest = sorted(delta, key=lambda n: report["cos"][n])[:2]
    assert (report["select"], report["num_layers"], report["num_layers_resolved"]) == ("number", "auto", 2)
    assert report["projected"] == [n for n in delta if n in lowest]


def test_apply_safelora_with_lora_equals_the_pure_function_on_the_merged_update(tiny, tokenizer):
    from safety_units.models.loading import build_tiny

    model, start = with_lora(tiny)
    base = {n: m.weight.detach() for n, m in target_weights(build_tiny(CACHE, seed=1).model).items()}
    delta = merged_delta(model, start)
    expect, expect_report = safelora_project(delta, start, base, select="number", num_layers=5)
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
    report = SafeLoRA(select="number", num_layers=5, base=TINY_BASE).apply(model, start, tokenizer, "cpu")
    assert report["projected"] == expect_report["projected"] and report["n_projected"] == 5
    assert report["num_layers_resolved"] == 5
    after = merged_delta(model, start)
    for n in delta:
        assert torch.allclose(after[n], expect[n], atol=1e-6), n
        b = n.replace(".weight", ".lora_B.default.weight")
        if n not in report["projected"]:
            assert torch.equal(dict(model.named_parameters())[b], b_before[b])  # untouched
    for n, m in target_weights(model).items():
        assert torch.equal(m.get_base_layer().weight, start[n])  # SafeLoRA moves only B


def test_safelora_defaults_resolve_auto_on_the_matrices_that_trained(tiny, tokenizer):
    model, start = with_lora(tiny)
    with torch.no_grad():  # 4 of the 14 adapted matrices keep B = 0: 10 trained -> round(10 * 10 / 64) = 2
        for name, p in model.named_parameters():
            if ".lora_B." in name and ("layers.1.mlp." in name or "layers.1.self_attn.o_proj." in name):
                p.zero_()
    report = SafeLoRA(base=TINY_BASE).apply(model, start, tokenizer, "cpu")
    assert (report["trained"], report["targets"]) == (10, 14)
    assert (report["select"], report["num_layers"], report["num_layers_resolved"], report["n_projected"]) == \
        ("number", "auto", 2, 2)


def test_safelora_config_builds_and_bad_settings_name_the_key(tiny, tokenizer):
    cfg = compose("train", ["defense=safelora"])
    defense = build_defense(cfg.defense)
    assert isinstance(defense, SafeLoRA) and defense.stage == "post"
    assert defense.base["_target_"].endswith("load_smollm2")  # a model config, not loaded when the run starts
    assert (defense.select, defense.threshold, defense.num_layers) == ("number", 0.5, "auto")
    for settings, match in [({"select": "top", "base": TINY_BASE}, "defense.select"),
                            ({"num_layers": 0, "base": TINY_BASE}, "defense.num_layers"),
                            ({"num_layers": "all", "base": TINY_BASE}, "defense.num_layers must be 'auto'"),
                            ({}, "defense.base"), ({"stage": "finetune", "base": TINY_BASE}, "defense.stage")]:
        with pytest.raises(ConfigError, match=match):
            SafeLoRA(**settings)
    start = {n: m.weight.detach().clone() for n, m in target_weights(tiny.model).items()}
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    for base, match in [({**TINY_BASE, "hidden_size": 32}, "defense.base"),
                        ({**TINY_BASE, "seed": 0}, "defense.base has the same weights")]:
        with pytest.raises(ConfigError, match=match):
            SafeLoRA(base=base).apply(tiny.model, start, tokenizer, "cpu")
