"""`scoring=contrast`: how much alignment moved each unit, by contrast with the base model.

As in the safety-neuron literature (activation contrasting between an aligned model and its base), on the same
calibration tokens:

    score_j = |mean_tokens x_j(model) - mean_tokens x_j(reference)| * ||W_out[:, j]||

x_j is unit j's activation at the input of down_proj / o_proj. The column norm is that of the model being
attributed: it turns an activation shift into the size of the change the unit writes into the residual stream,
which makes the scores comparable with `activation` and `wifv` (which weigh by the same column). The safety score
uses the safety calibration set, the utility score the utility set.

The reference model (`scoring.reference`, a model config; `scoring.reference_path=<dir>` for a local HF directory)
must have the same architecture, unit counts and vocabulary: the same token ids are fed to both (checked by
attribution.scorer.ReferenceScorer). Memory is O(units): the two runs share nothing but the per-unit float64 sums.
"""

from __future__ import annotations

import torch

from safety_units.attribution.scorer import ReferenceScorer, ScoringRun
from safety_units.attribution.scoring import activation_stats, column_norms
from safety_units.units.groups import UnitGroup


def contrast_scores(model, reference, groups: list[UnitGroup], ref_groups: list[UnitGroup], batches: list[dict],
                    tokens: str = "all", decision_tokens: int = 4, progress: bool = True,
                    desc: str = "contrast") -> dict[str, torch.Tensor]:
    """|mean x_j(model) - mean x_j(reference)| * ||W_out[:, j]|| (of `model`) per unit, on the same batches."""
    ours = activation_stats(model, groups, batches, tokens, decision_tokens, progress, f"{desc} (model)")
    device = next(model.parameters()).device
    reference.to(device)  # on the device only for its own pass: two large models need not fit at once
    try:
        theirs = activation_stats(reference, ref_groups, batches, tokens, decision_tokens, progress,
                                  f"{desc} (reference)")
    finally:
        reference.to("cpu")
    return {g.key: g.per_unit((ours[g.key].mean() - theirs[r.key].mean()).abs() * column_norms(g)).float()
            for g, r in zip(groups, ref_groups)}


class ContrastScorer(ReferenceScorer):
    """The contrast with the base model on the safety set (safety) and on the utility set (utility)."""

    def safety(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        return self.score(run, "safety")

    def utility(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        return self.score(run, "utility")

    def score(self, run: ScoringRun, which: str) -> dict[str, torch.Tensor]:
        return contrast_scores(run.model, run.reference, run.groups, run.ref_groups, run.batches(which),
                               self.tokens, self.decision_tokens, desc=self.desc(which))
