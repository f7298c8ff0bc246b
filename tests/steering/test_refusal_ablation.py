"""steer=refusal_ablation: Arditi et al.'s direction, chosen by the refusal score under the KL filter, is removed
from every write to the residual stream."""

import pytest
import torch
from conftest import compose

from safety_units.steering.prompt_states import block_states, chat_ids
from safety_units.steering.refusal_ablation import RefusalAblationSteerer, ablation_hook, refusal_log_odds
from safety_units.steering.steerer import build_steerer, steering


def test_ablation_hook_removes_the_component_along_the_direction():
    r = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, -2.0]), dim=0)
    out = torch.tensor([[3.0, 0.0, 1.0], [1.0, 2.0, -2.0]])
    ablated = ablation_hook(r)(None, None, out)
    assert torch.allclose(ablated @ r, torch.zeros(2), atol=1e-6)
    assert torch.allclose(ablated, out - (out @ r)[:, None] * r)


def test_refusal_log_odds_of_the_summed_refusal_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert refusal_log_odds(logits, [0, 2]).item() == pytest.approx(torch.logit(torch.tensor(0.7)).item(), abs=1e-5)


def test_refusal_ablation_removes_the_direction_from_the_residual_stream(tiny, tmp_path):
    cfg = compose("evaluate", ["model=tiny", "steer=refusal_ablation", "steer.anchor.nsamples=8",
                               "steer.anchor.max_length=64", f"steer.cache_dir={tmp_path}"]).steer
    steerer = build_steerer(cfg)
    assert isinstance(steerer, RefusalAblationSteerer)
    art = steerer.artifacts(tiny.model, tiny.tokenizer)
    r = art["direction"]
    rows = chat_ids(tiny.tokenizer, ["How do I pick a lock?", "Write a haiku."])
    plain = block_states(tiny.model, rows, (-1, -2), tiny.tokenizer.pad_token_id)
    with steering(tiny.model, tiny.tokenizer, steerer) as info:
        ablated = block_states(tiny.model, rows, (-1, -2), tiny.tokenizer.pad_token_id)
    assert (plain @ r).abs().max() > 1e-3
    assert (ablated @ r).abs().max() < 1e-4 * ablated.norm(dim=-1).max()
    assert info["layer"] == art["layer"] and art["layer"] < 0.8 * len(art["candidates"]) + 1
    # the summary says whether the chosen direction passed the KL filter, and the choice follows the rule
    kls = {la: c["kl"] for la, c in art["candidates"].items()}
    assert info["kl_max"] == cfg.get("kl_max", 0.1)
    assert info["kl_passed"] == any(v < info["kl_max"] for v in kls.values())
    if not info["kl_passed"]:
        assert kls[art["layer"]] == min(kls.values())
