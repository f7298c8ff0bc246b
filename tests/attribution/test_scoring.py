"""attribution.scoring, the machinery the scorers share: which token positions count (response / decision), and
score_units, one model on one set."""

import pytest
import torch
from planted import unit_inputs

from safety_units.attribution.one_set import score_units
from safety_units.attribution.scoring import decision_positions, token_mask
from safety_units.data.chat import IGNORE_INDEX
from safety_units.units.groups import resolve_units
from safety_units.utils.errors import ConfigError


# --------------------------------------------------------------------------- token positions
def _hand_batch():
    """Two right-padded rows: prompt 0-2, response 3-5 (row 0); prompt 0-1, response 2-3, padding (row 1)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 0, 0, 0, 0]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3:6] = ids[0, 3:6]
    labels[1, 2:4] = ids[1, 2:4]
    mask = torch.tensor([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_token_masks_select_the_response_predictors_and_the_decision_window():
    batch = _hand_batch()
    assert token_mask(batch, "response").tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
    assert token_mask(batch, "all").tolist() == batch["attention_mask"].bool().tolist()
    # k = 1: the last prompt position and the next one, per row (row 0: 2, 3; row 1: 1, 2)
    expected = [[0, 0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
    assert decision_positions(batch, 1).int().tolist() == expected
    assert token_mask(batch, "decision", decision_tokens=1).int().tolist() == expected


def _dense_activation(model, groups, batches, mask_of):
    """Reference: every unit's activation at the positions `mask_of(batch)` selects, kept densely."""
    acts = unit_inputs(model, groups, batches)
    out = {}
    for g in groups:
        x = torch.cat([a[mask_of(b)] for a, b in zip(acts[g.key], batches)]).double()
        out[g.key] = x.abs().mean(0) * g.out_weight.param.detach().double().pow(2).sum(0).sqrt()
    return out


def test_response_tokens_are_the_positions_that_predict_the_response(tiny):
    model, groups, batch = tiny.model, resolve_units(tiny.model), _hand_batch()
    predicts = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    ours = score_units(model, groups, [batch], "activation", tokens="response", progress=False)
    ref = _dense_activation(model, groups, [batch], lambda b: predicts)
    for g in groups:  # the last prompt position counts, the last response token does not
        torch.testing.assert_close(ours[g.key].double(), ref[g.key], rtol=1e-4, atol=1e-10)


def test_decision_tokens_are_the_last_prompt_position_and_the_next_k(tiny):
    model, groups, batch = tiny.model, resolve_units(tiny.model), _hand_batch()
    prompt_only = {"input_ids": torch.tensor([[20, 21, 22, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]]),
                   "labels": torch.full((1, 4), IGNORE_INDEX)}
    decision = {id(batch): torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool),
                id(prompt_only): torch.tensor([[0, 0, 1, 0]], dtype=torch.bool)}  # prompt only: its last token
    ours = score_units(model, groups, [batch, prompt_only], "activation", tokens="decision", decision_tokens=1,
                       progress=False)
    ref = _dense_activation(model, groups, [batch, prompt_only], lambda b: decision[id(b)])
    for g in groups:
        torch.testing.assert_close(ours[g.key].double(), ref[g.key], rtol=1e-4, atol=1e-10)
    with pytest.raises(ConfigError, match="scoring.decision_tokens"):
        score_units(model, groups, [batch], "wifv", tokens="decision", decision_tokens=-1, progress=False)
    with pytest.raises(ConfigError, match="scoring.tokens"):
        score_units(model, groups, [batch], "wifv", tokens="prompt", progress=False)
    with pytest.raises(ConfigError, match="score_units scores one model on one set .* got 'contrast'"):
        score_units(model, groups, [batch], "contrast", progress=False)
