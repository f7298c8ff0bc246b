"""scoring=wifv and scoring=activation (attribution.wifv): each scorer's formula on its own set, against dense
activations kept per token."""

import torch
from planted import safety_batches, unit_inputs

from safety_units.attribution.scorer import ScoringRun
from safety_units.attribution.wifv import ActivationScorer, WifvScorer
from safety_units.units.groups import resolve_units


def test_wifv_and_activation_match_a_dense_reference_on_their_own_set(tiny, tmp_path):
    model, groups = tiny.model, resolve_units(tiny.model)
    batches = safety_batches(tiny.tokenizer, tmp_path)
    acts = unit_inputs(model, groups, batches)
    run = ScoringRun(model, groups, built={"safety": batches, "utility": batches[:1]})
    wifv = WifvScorer("wifv").safety(run)
    act = ActivationScorer("activation").safety(run)
    act_utility = ActivationScorer("activation").utility(run)  # the utility set: the first batch only
    for g in groups:
        x = torch.cat([a[b["attention_mask"].bool()] for a, b in zip(acts[g.key], batches)]).double()
        first = acts[g.key][0][batches[0]["attention_mask"].bool()].double()
        col = g.out_weight.param.detach().double().pow(2).sum(0)  # ||W[:, j]||^2 (Linear: columns)
        torch.testing.assert_close(wifv[g.key].double(), x.var(0, unbiased=False) * col, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(act[g.key].double(), x.abs().mean(0) * col.sqrt(), rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(act_utility[g.key].double(), first.abs().mean(0) * col.sqrt(), rtol=1e-4,
                                   atol=1e-10)
