"""defense=antidote (safety_units.defenses.antidote): Wanda pruning per row (the code's count and ties) and per
matrix, the calibration norms, the edit on a tiny Llama (LoRA factors, merged update, full weights) against the pure
functions, and its config errors."""

import pytest
import torch
from conftest import compose
from defense_kit import antidote_settings, code_row_mask, merged_delta, with_lora

from safety_units.defenses.antidote import (Antidote, activation_norms, antidote_prune, input_norms, n_pruned,
                                            pruned_per_row)
from safety_units.defenses.base import build_defense
from safety_units.defenses.posthoc import target_weights
from safety_units.utils.errors import ConfigError


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def antidote(tmp_path):
    return Antidote(**antidote_settings(tmp_path))


def test_counts_follow_the_codes_rounding():
    # prune_wanda_outlier: each row keeps its int(cols * (1 - dense_ratio)) lowest scores
    assert [pruned_per_row(c, 0.1) for c in (10, 100, 576, 7, 8, 4, 64)] == [1, 10, 58, 1, 1, 1, 7]
    assert pruned_per_row(576, 1e-5) == 1 and pruned_per_row(9, 1.0) == 9 and pruned_per_row(3, 0.5) == 2
    assert [n_pruned(n, 0.1) for n in (10, 100, 576, 7)] == [1, 10, 58, 1]  # matrix: ceil over the whole matrix
    with pytest.raises(ValueError, match="dense_ratio"):
        antidote_prune({"w": torch.ones(2, 2)}, {"w": torch.ones(2)}, dense_ratio=0)
    with pytest.raises(ValueError, match="granularity"):
        antidote_prune({"w": torch.ones(2, 2)}, {"w": torch.ones(2)}, granularity="column")


def test_row_granularity_prunes_the_codes_entries_of_every_row():
    g = gen(3)
    d = torch.randint(-3, 4, (12, 9), generator=g).float()  # integer values: many tied scores
    x = torch.randint(1, 3, (9,), generator=g).double()
    new, report = antidote_prune({"w": d}, {"w": x}, dense_ratio=0.25)
    mask = code_row_mask(d.abs().double() * x, 0.25)
    assert (mask.sum(1) == 9 - int(9 * 0.75)).all() and report["per_row"] == {"w": 3}
    assert report["pruned"] == {"w": 36} and report["n_entries"] == 108 and report["granularity"] == "row"
    assert torch.equal(new["w"], d.masked_fill(mask, 0))
    assert report["removed_norm_share"] == pytest.approx(float(d[mask].norm() / d.norm()))


def test_matrix_granularity_zeroes_the_top_scored_entries_of_the_matrix():
    g = gen(3)
    d = torch.randint(-3, 4, (12, 9), generator=g).float()
    x = torch.randint(1, 3, (9,), generator=g).double()
    new, report = antidote_prune({"w": d}, {"w": x}, dense_ratio=0.1, granularity="matrix")
    assert report["pruned"] == {"w": 11} and "per_row" not in report
    # brute force: by score descending, ties by flat index
    scores = [(abs(d.view(-1)[i].item()) * x[i % 9].item(), i) for i in range(d.numel())]
    top = {i for _, i in sorted(scores, key=lambda t: (-t[0], t[1]))[:11]}
    expect = d.clone().view(-1)
    expect[sorted(top)] = 0
    assert torch.equal(new["w"], expect.view(12, 9))


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


def test_apply_antidote_with_lora_prunes_each_factor_row_by_its_own_activations(tiny, tokenizer, antidote):
    model, start = with_lora(tiny)
    delta = merged_delta(model, start)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items() if ".lora_" in n}
    batches = antidote.calibration_batches(tokenizer)
    x = input_norms(model, batches)  # the layer input X, which lora_A reads
    targets = target_weights(model)
    mid = {n: [] for n in targets}  # A X: lora_A's output is lora_B's input (dropout 0)
    hooks = [m.lora_A["default"].register_forward_hook(lambda mod, a, o, n=n: mid[n].append(o)) for n, m in
             targets.items()]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    report = antidote.apply(model, start, tokenizer, "cpu")
    assert report["pruned_kinds"] == ["lora_A", "lora_B"] and report["granularity"] == "row"
    for n in targets:
        ax = torch.cat([o[b["attention_mask"].bool()] for o, b in zip(mid[n], batches)]).double().pow(2).sum(0).sqrt()
        for kind, norms in (("lora_A", x[n]), ("lora_B", ax)):
            key = n.replace(".weight", f".{kind}.default.weight")
            w = before[key]
            cols = w.shape[1]  # lora_A: the layer's inputs (64 or 128); lora_B: the rank, 4 -> 1 a row
            mask = code_row_mask(w.abs().double() * norms, 0.1)
            assert report["per_row"][key] == cols - int(cols * 0.9) and report["pruned"][key] == int(mask.sum())
            assert torch.equal(params[key], w.masked_fill(mask, 0)), key  # zeroed there, untouched elsewhere
    for n, m in targets.items():
        assert torch.equal(m.get_base_layer().weight, start[n])  # the aligned weights are never touched
    after = merged_delta(model, start)
    removed = sum(float((delta[n] - after[n]).double().pow(2).sum()) for n in delta)
    assert report["removed_norm_share"] == pytest.approx((removed / sum(float(d.double().pow(2).sum())
                                                                       for d in delta.values())) ** 0.5, rel=1e-5)


def test_apply_antidote_matrix_with_lora_equals_the_pure_function_on_the_merged_update(tiny, tokenizer, tmp_path):
    antidote = Antidote(**{**antidote_settings(tmp_path), "granularity": "matrix"})
    model, start = with_lora(tiny)
    delta = merged_delta(model, start)
    batches = antidote.calibration_batches(tokenizer)
    assert len(batches) == 3 and sum(len(b["input_ids"]) for b in batches) == 5
    expect, expect_report = antidote_prune(delta, input_norms(model, batches), 0.1, "matrix")
    report = antidote.apply(model, start, tokenizer, "cpu")
    assert report["pruned"] == expect_report["pruned"] and report["calibration_tokens"] > 0
    assert report["removed_norm_share"] == pytest.approx(expect_report["removed_norm_share"])
    after = merged_delta(model, start)
    for n in delta:
        assert torch.allclose(after[n], expect[n], atol=1e-6), n
        pruned = (expect[n] == 0) & (delta[n] != 0)
        assert after[n][pruned].abs().max() <= 1e-6  # merged = W_aligned there


def test_apply_antidote_on_full_weights_resets_exactly_the_pruned_entries_of_each_row(tiny, tokenizer, antidote):
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
    norms = input_norms(model, antidote.calibration_batches(tokenizer))
    report = antidote.apply(model, start, tokenizer, "cpu")
    assert report["trained"] == 7 and report["targets"] == 14 and report["pruned_kinds"] == ["update"]
    for n, m in targets.items():
        if n not in delta:
            assert torch.equal(m.weight, start[n])
            continue
        pruned = code_row_mask(delta[n].abs().double() * norms[n], 0.1)
        cols = delta[n].shape[1]
        assert (pruned.sum(1) == cols - int(cols * 0.9)).all() and report["pruned"][n] == int(pruned.sum())
        assert torch.equal(m.weight[pruned], start[n][pruned])  # W_aligned exactly
        assert torch.equal(m.weight[~pruned], trained[n][~pruned])  # bit-identical


def test_activation_norms_names_a_module_no_token_reached(tiny):
    batch = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    with pytest.raises(ValueError, match="lm_head"):
        activation_norms(tiny.model, {"lm_head": tiny.model.lm_head}, [batch])  # hidden_states skips the head


def test_antidote_config_builds_and_bad_settings_name_the_key(tmp_path):
    defense = build_defense(compose("train", ["defense=antidote"]).defense)
    assert isinstance(defense, Antidote) and defense.stage == "post"
    assert (defense.dense_ratio, defense.granularity, defense.nsamples, defense.harmful[0].limit) == \
        (0.1, "row", 64, 64)
    assert defense.harmful[0].hash_split == [0.0, 0.5]  # the attack pool's other half
    settings = antidote_settings(tmp_path)
    for bad, match in [({"dense_ratio": 1.5}, "defense.dense_ratio"), ({"nsamples": 0}, "defense.nsamples"),
                       ({"batch_size": None}, "defense.batch_size"), ({"harmful": {}}, "defense.harmful"),
                       ({"granularity": "column"}, "defense.granularity")]:
        with pytest.raises(ConfigError, match=match):
            Antidote(**{**settings, **bad})
