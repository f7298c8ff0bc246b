"""scoring=snip (attribution.snip): first-order SNIP per unit against dense per-weight gradients, without dropout,
with gradient checkpointing kept on."""

import torch
from planted import safety_batches

from safety_units.attribution.scorer import ScoringRun
from safety_units.attribution.one_set import score_units
from safety_units.attribution.snip import SnipScorer
from safety_units.data.chat import IGNORE_INDEX
from safety_units.units.groups import resolve_units


def test_snip_matches_dense_per_weight_reference(tiny, tmp_path):
    model, groups = tiny.model, resolve_units(tiny.model)
    batches = safety_batches(tiny.tokenizer, tmp_path)
    ref = {g.key: torch.zeros(g.n, dtype=torch.float64) for g in groups}
    for b in batches:  # the naive way: dense gradients and dense per-weight scores
        model.zero_grad()
        model(**b).loss.backward()
        for g in groups:
            for s in g.slices:
                dense = (s.param.detach() * s.param.grad).abs().double()
                ref[g.key] += dense.sum(dim=1 - s.dim) if dense.ndim == 2 else dense
    model.zero_grad()
    ours = SnipScorer("snip").safety(ScoringRun(model, groups, built={"safety": batches}))
    for g in groups:
        torch.testing.assert_close(ours[g.key].double(), ref[g.key], rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_snip_runs_without_dropout_and_keeps_checkpointing():
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(p):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=100,
                                          resid_pdrop=p, embd_pdrop=p, attn_pdrop=p))

    model, plain = gpt2(0.1), gpt2(0.0)  # same weights; `plain` has no dropout at all
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 100, (3, 24), generator=g)
        labels = ids.clone()
        labels[:, :10] = IGNORE_INDEX
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    calls = []
    model.transformer.h[0].mlp.register_forward_pre_hook(lambda mod, args: calls.append(1))
    model.train()
    ours = score_units(model, resolve_units(model), batches, "snip", progress=False)
    assert len(calls) == 2 * len(batches)  # each forward is recomputed in backward: checkpointing still on
    assert model.training and all(m.training for m in model.modules())  # mode restored
    ref = score_units(plain, resolve_units(plain), batches, "snip", gradient_checkpointing=False, progress=False)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-9)
