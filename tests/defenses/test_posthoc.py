"""Post-hoc defenses (safety_units.defenses.posthoc): SafeLoRA's projection, Antidote's Wanda pruning of the update, the
calibration norms, and apply_posthoc on a tiny Llama (plain and with LoRA) against the pure functions."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from safety_units.utils.errors import ConfigError
from safety_units.defenses.posthoc import (
    PostHocDefense,
    alignment_matrix,
    antidote_prune,
    apply_posthoc,
    harmful_batches,
    input_norms,
    n_pruned,
    safelora_project,
    target_weights,
)

torch.set_num_threads(1)
CACHE = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))
TINY_BASE = {"_target_": "safety_units.models.loading.build_tiny", "cache_dir": CACHE, "seed": 1}


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- SafeLoRA
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
    new, report = safelora_project(delta, {k: aligned for k in delta}, {k: base for k in delta}, threshold=0.5)
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
    new, report = safelora_project({"w": s * b @ a}, {"w": aligned}, {"w": base}, threshold=1.0)
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


# --------------------------------------------------------------------------- Antidote
def test_antidote_zeroes_exactly_the_top_scored_entries():
    g = gen(3)
    d = torch.randint(-3, 4, (12, 9), generator=g).float()  # integer values: many tied scores
    x = torch.randint(1, 3, (9,), generator=g).double()
    new, report = antidote_prune({"w": d}, {"w": x}, dense_ratio=0.1)
    k = n_pruned(d.numel(), 0.1)
    assert k == 11 and report["pruned"] == {"w": 11} and report["n_entries"] == 108
    # brute force: by score descending, ties by flat index
    scores = [(abs(d.view(-1)[i].item()) * x[i % 9].item(), i) for i in range(d.numel())]
    top = {i for _, i in sorted(scores, key=lambda t: (-t[0], t[1]))[:k]}
    expect = d.clone().view(-1)
    expect[sorted(top)] = 0
    assert torch.equal(new["w"], expect.view(12, 9))
    assert torch.equal(d, new["w"] + torch.where(new["w"] == 0, d, 0))  # the others untouched


def test_antidote_counts_follow_the_codes_rounding():
    assert [n_pruned(n, 0.1) for n in (10, 100, 576, 7)] == [1, 10, 58, 1]  # ceil: cols - int(cols * 0.9)
    assert n_pruned(10, 1.0) == 10 and n_pruned(3, 0.5) == 2
    with pytest.raises(ValueError, match="dense_ratio"):
        antidote_prune({"w": torch.ones(2, 2)}, {"w": torch.ones(2)}, dense_ratio=0)


# --------------------------------------------------------------------------- models
def train_b(model, seed=4):
    """Random LoRA B factors, as after training (B starts at zero)."""
    g = gen(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture
def lora_tiny(tiny):
    """The tiny Llama (W_aligned = its weights) with LoRA adapters, B random."""
    from safety_units.models.lora import LoraAdapter

    start = {n: m.weight.detach().clone() for n, m in target_weights(tiny.model).items()}
    model, _ = LoraAdapter(rank=4, alpha=8, dropout=0.0).wrap(tiny.model)
    train_b(model)
    return model, start


def merged_delta(model, start):
    from safety_units.models.lora import effective_weight

    return {n: effective_weight(m).float() - start[n] for n, m in target_weights(model).items()}


def test_target_weights_names_plain_lora_and_peft_models_alike(tiny):
    from peft import LoraConfig, get_peft_model

    names = sorted(target_weights(tiny.model))
    assert len(names) == 14 and "model.layers.1.mlp.down_proj.weight" in names
    peft = get_peft_model(tiny.model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    assert sorted(target_weights(peft)) == names


def test_input_norms_match_a_manual_computation_and_skip_padding(tiny):
    from safety_units.data.chat import Encoded, collate

    model = tiny.model.eval()
    seqs = [[5, 9, 33, 2, 7, 11], [4, 8, 15]]
    batch = collate([Encoded(s, s) for s in seqs], pad_id=0)  # padded to 8 tokens
    norms = input_norms(model, [batch])
    # layer 0 q_proj reads RMSNorm(embedding) of each real token: no hook involved
    x = torch.cat([model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(s))) for s in seqs])
    assert torch.allclose(norms["model.layers.0.self_attn.q_proj.weight"], x.double().pow(2).sum(0).sqrt(),
                          rtol=1e-5)
    # a deep weight: the padded batch equals the sequences run alone, unpadded
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 128)))
    with torch.no_grad():
        for s in seqs:
            model(input_ids=torch.tensor([s]))
    h.remove()
    manual = torch.cat(seen).double().pow(2).sum(0).sqrt()
    assert torch.allclose(norms["model.layers.1.mlp.down_proj.weight"], manual, rtol=1e-4)
    assert norms["model.layers.1.mlp.down_proj.weight"].dtype == torch.float64


def test_input_norms_removes_its_hooks_when_a_batch_fails(tiny):
    good = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    bad = {"input_ids": torch.tensor([[10**9]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    with pytest.raises(IndexError):
        input_norms(tiny.model, [good, bad])
    assert all(not m._forward_hooks for m in tiny.model.modules())


@pytest.fixture
def harmful_cfg(tmp_path):
    rows = [{"prompt": f"how do I do bad thing {i}?", "response": f"Step {i}: do the bad thing carefully."}
            for i in range(6)]
    path = tmp_path / "harm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": "antidote", "stage": "post", "dense_ratio": 0.1, "nsamples": 5, "max_length": 32,
            "batch_size": 2, "harmful": {"h": {"path": str(path), "prompt": "prompt", "response": "response"}}}


def test_apply_safelora_with_lora_equals_the_pure_function_on_the_merged_update(lora_tiny, tokenizer):
    from safety_units.models.loading import build_tiny

    model, start = lora_tiny
    base = {n: m.weight.detach() for n, m in target_weights(build_tiny(CACHE, seed=1).model).items()}
    delta = merged_delta(model, start)
    expect, expect_report = safelora_project(delta, start, base, select="number", num_layers=5)
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
    cfg = {"name": "safelora", "stage": "post", "select": "number", "num_layers": 5, "base": TINY_BASE}
    report = apply_posthoc(model, start, cfg, tokenizer, "cpu")
    assert report["projected"] == expect_report["projected"] and report["n_projected"] == 5
    after = merged_delta(model, start)
    for n in delta:
        assert torch.allclose(after[n], expect[n], atol=1e-6), n
        b = n.replace(".weight", ".lora_B.default.weight")
        if n not in report["projected"]:
            assert torch.equal(dict(model.named_parameters())[b], b_before[b])  # untouched
    for n, m in target_weights(model).items():
        assert torch.equal(m.get_base_layer().weight, start[n])  # SafeLoRA moves only B


def test_apply_antidote_with_lora_equals_the_pure_function_on_the_merged_update(lora_tiny, tokenizer, harmful_cfg):
    model, start = lora_tiny
    delta = merged_delta(model, start)
    batches = harmful_batches(harmful_cfg, tokenizer)
    assert len(batches) == 3 and sum(len(b["input_ids"]) for b in batches) == 5
    expect, expect_report = antidote_prune(delta, input_norms(model, batches), 0.1)
    report = apply_posthoc(model, start, harmful_cfg, tokenizer, "cpu")
    assert report["pruned"] == expect_report["pruned"] and report["calibration_tokens"] > 0
    after = merged_delta(model, start)
    for n in delta:
        assert torch.allclose(after[n], expect[n], atol=1e-6), n
        pruned = (expect[n] == 0) & (delta[n] != 0)
        assert int(pruned.sum()) == report["pruned"][n]
        assert after[n][pruned].abs().max() <= 1e-6  # merged = W_aligned there


def test_apply_antidote_on_full_weights_resets_exactly_the_pruned_entries(tiny, tokenizer, harmful_cfg):
    model = tiny.model
    targets = target_weights(model)
    start = {n: m.weight.detach().clone() for n, m in targets.items()}
    g = gen(5)
    with torch.no_grad():
        for n, m in targets.items():
            if "layers.0." in n:  # layer 1 stays as loaded (dW = 0): left out
                m.weight.add_(0.01 * torch.randn(m.weight.shape, generator=g))
    trained = {n: m.weight.detach().clone() for n, m in targets.items()}
    delta = {n: trained[n] - start[n] for n in start if "layers.0." in n}
    expect, _ = antidote_prune(delta, input_norms(model, harmful_batches(harmful_cfg, tokenizer)), 0.1)
    report = apply_posthoc(model, start, harmful_cfg, tokenizer, "cpu")
    assert report["trained"] == 7 and report["targets"] == 14
    for n, m in targets.items():
        if n not in delta:
            assert torch.equal(m.weight, start[n])
            continue
        pruned = expect[n] == 0
        assert torch.equal(m.weight[pruned], start[n][pruned])  # W_aligned exactly
        assert torch.equal(m.weight[~pruned], trained[n][~pruned])  # bit-identical


def test_callback_snapshots_at_setup_applies_at_train_end_and_refuses_sharding(tiny, tokenizer, harmful_cfg):
    from safety_units.models.lora import LoraAdapter

    loaded = {n: m.weight.detach().clone() for n, m in target_weights(tiny.model).items()}
    model, _ = LoraAdapter(rank=4, alpha=8, dropout=0.0).wrap(tiny.model)
    module = SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    trainer = SimpleNamespace(strategy=SimpleNamespace(), is_global_zero=True, loggers=[], global_step=3)
    cb = PostHocDefense(harmful_cfg)
    cb.setup(trainer, module, "fit")
    assert sorted(cb.start) == sorted(loaded) and all(torch.equal(cb.start[n], loaded[n]) for n in loaded)
    train_b(model)
    expect, _ = antidote_prune(merged_delta(model, loaded),
                               input_norms(model, harmful_batches(harmful_cfg, tokenizer)), 0.1)
    cb.on_train_end(trainer, module)
    assert cb.report["defense"] == "antidote" and cb.report["n_pruned"] == sum(n_pruned(e.numel(), 0.1)
                                                                               for e in expect.values())
    after = merged_delta(model, loaded)
    assert all(torch.allclose(after[n], expect[n], atol=1e-6) for n in expect)

    class FSDPStrategy:
        pass

    with pytest.raises(ConfigError, match="FSDPStrategy"):
        PostHocDefense(harmful_cfg).setup(SimpleNamespace(strategy=FSDPStrategy(), is_global_zero=True), module, "fit")


def test_config_errors_name_the_key(tiny, tokenizer, harmful_cfg):
    start = {n: m.weight.detach().clone() for n, m in target_weights(tiny.model).items()}
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    cases = [({"name": "nope"}, "defense.name"),
             ({"name": "safelora", "base": {**TINY_BASE, "hidden_size": 32}}, "defense.base"),
             ({"name": "safelora", "base": {**TINY_BASE, "seed": 0}}, "defense.base has the same weights"),
             ({"name": "safelora", "base": TINY_BASE, "select": "top"}, "defense.select"),
             ({**harmful_cfg, "dense_ratio": 1.5}, "defense.dense_ratio"),
             ({**harmful_cfg, "nsamples": 0}, "defense.nsamples")]
    for cfg, match in cases:
        with pytest.raises(ConfigError, match=match):
            apply_posthoc(tiny.model, start, cfg, tokenizer, "cpu")


def test_defense_configs_compose():
    from conftest import compose

    cfg = compose("train", ["defense=safelora"])
    assert cfg.defense.stage == "post" and cfg.defense.base._target_.endswith("load_smollm2")
    assert (cfg.defense.select, cfg.defense.threshold, cfg.defense.num_layers) == ("threshold", 0.5, 10)
    cfg = compose("train", ["defense=antidote"])
    assert cfg.defense.dense_ratio == 0.1 and cfg.defense.harmful.beavertails.limit == 64
