"""defense=antidote (safety_units.defenses.antidote): Wanda pruning of the update against the code's counts, the
calibration norms, the edit on a tiny Llama (plain and with LoRA) against the pure function, and its config errors."""

import pytest
import torch
from conftest import compose
from defense_kit import antidote_settings, merged_delta, with_lora

from safety_units.defenses.antidote import Antidote, antidote_prune, input_norms, n_pruned
from safety_units.defenses.base import build_defense
from safety_units.defenses.posthoc import target_weights
from safety_units.utils.errors import ConfigError


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def antidote(tmp_path):
    return Antidote(**antidote_settings(tmp_path))


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


def test_apply_antidote_with_lora_equals_the_pure_function_on_the_merged_update(tiny, tokenizer, antidote):
    model, start = with_lora(tiny)
    delta = merged_delta(model, start)
    batches = antidote.calibration_batches(tokenizer)
    assert len(batches) == 3 and sum(len(b["input_ids"]) for b in batches) == 5
    expect, expect_report = antidote_prune(delta, input_norms(model, batches), 0.1)
    report = antidote.apply(model, start, tokenizer, "cpu")
    assert report["pruned"] == expect_report["pruned"] and report["calibration_tokens"] > 0
    after = merged_delta(model, start)
    for n in delta:
        assert torch.allclose(after[n], expect[n], atol=1e-6), n
        pruned = (expect[n] == 0) & (delta[n] != 0)
        assert int(pruned.sum()) == report["pruned"][n]
        assert after[n][pruned].abs().max() <= 1e-6  # merged = W_aligned there


def test_apply_antidote_on_full_weights_resets_exactly_the_pruned_entries(tiny, tokenizer, antidote):
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
    expect, _ = antidote_prune(delta, input_norms(model, antidote.calibration_batches(tokenizer)), 0.1)
    report = antidote.apply(model, start, tokenizer, "cpu")
    assert report["trained"] == 7 and report["targets"] == 14
    for n, m in targets.items():
        if n not in delta:
            assert torch.equal(m.weight, start[n])
            continue
        pruned = expect[n] == 0
        assert torch.equal(m.weight[pruned], start[n][pruned])  # W_aligned exactly
        assert torch.equal(m.weight[~pruned], trained[n][~pruned])  # bit-identical


def test_antidote_config_builds_and_bad_settings_name_the_key(tmp_path):
    defense = build_defense(compose("train", ["defense=antidote"]).defense)
    assert isinstance(defense, Antidote) and defense.stage == "post"
    assert (defense.dense_ratio, defense.nsamples, defense.harmful[0].limit) == (0.1, 64, 64)
    settings = antidote_settings(tmp_path)
    for bad, match in [({"dense_ratio": 1.5}, "defense.dense_ratio"), ({"nsamples": 0}, "defense.nsamples"),
                       ({"batch_size": None}, "defense.batch_size"), ({"harmful": {}}, "defense.harmful")]:
        with pytest.raises(ConfigError, match=match):
            Antidote(**{**settings, **bad})
