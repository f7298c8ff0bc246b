"""scoring=delta (attribution.delta): each unit's weight change against the base model, from the weights alone."""

import torch
from conftest import compose

from safety_units.attribution.scorer import ScoringRun
from safety_units.attribution.delta import DeltaScorer
from safety_units.models.loading import build_tiny
from safety_units.units.groups import resolve_units


def test_delta_is_the_norm_of_each_units_weight_change():
    """scoring=delta by hand: a change on one unit's slices (gate/up rows, the down_proj column; an o_proj column)
    scores exactly that unit, with the L2 norm over all its slices; untouched units score 0. No batch is read."""
    cache = compose("attribute", ["model=tiny"]).paths.cache_dir
    ref, model = build_tiny(cache_dir=cache).model, build_tiny(cache_dir=cache).model
    mlp, attn = model.model.layers[0].mlp, model.model.layers[1].self_attn
    with torch.no_grad():
        mlp.gate_proj.weight[5] += 1.0   # 64 entries of +1
        mlp.down_proj.weight[:, 5] -= 2.0  # 64 entries of -2
        attn.o_proj.weight[:, 3] += 0.5  # 64 entries of +0.5
    run = ScoringRun(model, resolve_units(model), reference=ref, ref_groups=resolve_units(ref))  # no batches
    scores = DeltaScorer("delta").safety(run)
    torch.testing.assert_close(scores["mlp.0"][5], torch.tensor((64 * 1.0 + 64 * 4.0) ** 0.5))
    torch.testing.assert_close(scores["attn.1"][3], torch.tensor((64 * 0.25) ** 0.5))
    assert int((scores["mlp.0"] > 0).sum()) == 1 and int((scores["attn.1"] > 0).sum()) == 1
    assert all(float(v.abs().sum()) == 0.0 for k, v in scores.items() if k not in ("mlp.0", "attn.1"))
