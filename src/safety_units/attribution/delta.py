"""`scoring=delta`: where alignment wrote -- the size of each unit's weight change against a reference model.

SafeLoRA's alignment matrix (W_aligned - W_base) and Wei et al.'s low-rank analysis read safety from the weight
change that alignment made. Restricted to units, with the same slices the masks freeze (rows of gate/up and their
biases, the column of down_proj; the column of o_proj):

    safety_j = sqrt( sum over the unit's slices of ||W_model[slice_j] - W_reference[slice_j]||^2 )

No forward pass and no data: only the two models' weights. The reference is the model the attributed one was
trained from (`scoring.reference` / `scoring.reference_path`, checked as for `contrast`: same architecture, unit
counts and vocabulary, not the same weights). The utility score, which the weights alone cannot give, is the
`activation` score on the utility calibration set, as `refusal_direction` does: how much the unit writes on benign
data. Memory: one slice difference at a time, O(units) kept. A head (units.heads) sums its q rows and o columns;
a grouped-query K/V block's squared change is split evenly among the heads that read it (it counts once).
"""

from __future__ import annotations

import torch

from safety_units.attribution.scorer import ReferenceScorer, ScoringRun
from safety_units.units.groups import UnitGroup
from safety_units.utils.errors import ConfigError


@torch.no_grad()
def delta_scores(groups: list[UnitGroup], ref_groups: list[UnitGroup]) -> dict[str, torch.Tensor]:
    """Per unit group: the L2 norm of the weight change over each unit's slices (float32, one value per unit)."""
    out = {}
    for g, r in zip(groups, ref_groups):
        if g.key != r.key or len(g.slices) != len(r.slices):
            raise ConfigError(f"scoring=delta: unit group {g.key} differs from the reference's {r.key}.")
        sq = torch.zeros(g.n, dtype=torch.float64)
        for s, t in zip(g.slices, r.slices):
            if s.param.shape != t.param.shape:
                raise ConfigError(f"scoring=delta: {s.name} has shape {tuple(s.param.shape)}, the reference's "
                                  f"{tuple(t.param.shape)}.")
            diff = s.param.detach().double().cpu() - t.param.detach().double().cpu()
            sq += s.unit_values(diff * diff)  # a head: its rows/columns; an expert channel: its expert's entries
        out[g.key] = sq.sqrt().float()
    return out


class DeltaScorer(ReferenceScorer):
    """Safety: the weight change against the base model (no data); utility: `activation` on the utility set."""

    def safety(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        return delta_scores(run.groups, run.ref_groups)
