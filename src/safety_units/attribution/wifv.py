"""`scoring=wifv` (the drift callback's default too) and `scoring=activation`: forward-only scores from each unit's
activation statistics, the same statistic on the safety set (safety score) and on the utility set (utility score).

* wifv (FLAP-style fluctuation): Var_tokens(x_j) * ||W_out[:, j]||^2
* activation (Wanda-style, aggregated per unit): mean_tokens |x_j| * ||W_out[:, j]||

x_j is unit j's activation at the input of down_proj / o_proj at the `scoring.tokens` positions, W_out[:, j] the
weight column it feeds. One computation (attribution.scoring.activation_scores), two formulas on its sums.
"""

from __future__ import annotations

import torch

from safety_units.attribution.scorer import Scorer, ScoringRun
from safety_units.attribution.scoring import activation_scores


class WifvScorer(Scorer):
    """Var_tokens(x_j) * ||W_out[:, j]||^2 on each set."""
    statistic = "wifv"  # the formula of activation_scores

    def __init__(self, method: str, tokens: str = "all", decision_tokens: int = 4,
                 gradient_checkpointing: bool = True):
        # gradient_checkpointing: no backward pass here; the key stays in the YAML beside snip's (no effect)
        super().__init__(method, tokens, decision_tokens)

    def safety(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        return self.score(run, "safety")

    def utility(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        return self.score(run, "utility")

    def score(self, run: ScoringRun, which: str) -> dict[str, torch.Tensor]:
        return activation_scores(run.model, run.groups, run.batches(which), self.statistic, tokens=self.tokens,
                                 decision_tokens=self.decision_tokens, desc=self.desc(which))


class ActivationScorer(WifvScorer):
    """mean_tokens |x_j| * ||W_out[:, j]|| on each set."""
    statistic = "activation"
