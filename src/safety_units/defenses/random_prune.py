"""`defense=random_prune`: Antidote's random-pruning control (git-disl/Antidote train.py, `--random_prune True`,
script/finetune/antidote_dense_ratio_random.sh): the same edit as defense=antidote, the pruned entries drawn uniformly
at random instead of by Wanda score, so that what pruning alone does (shrinking the update) can be told apart from
what Antidote's choice of entries does. No calibration data."""

from __future__ import annotations

import torch

from safety_units.defenses.antidote import UpdatePruning
from safety_units.defenses.posthoc import checked_number


class RandomPrune(UpdatePruning):
    """Antidote's edit (safety_units.defenses.antidote.UpdatePruning: the same tensors, the same count per row or
    per matrix at the same dense_ratio and granularity) on entries drawn uniformly at random: every entry gets a
    uniform score from one torch.Generator seeded with `seed`, drawn tensor by tensor in the model's module order, and
    the highest are pruned.
    The code (train.py, random_prune branch) zeroes int(numel * dense_ratio) entries drawn uniformly over each whole
    trainable tensor (torch.randperm, the run's global seed): the LoRA factors of the second LoRA, or under full
    fine-tuning every trainable weight. Deviation kept: here the count is Antidote's own -- per row with
    granularity=row (the default) -- so the control differs from Antidote only in which entries are chosen;
    granularity=matrix draws over the whole tensor as the code does (ceil instead of the code's floor, as Antidote's
    matrix count). Full fine-tuning: random entries of the update dW are reset to W_aligned, as Antidote here."""

    def __init__(self, name: str = "random_prune", stage: str = "post", dense_ratio: float = 0.1,
                 granularity: str = "row", seed: int = 0):
        super().__init__(name, stage, dense_ratio, granularity)
        self.seed = checked_number(seed, "seed", True, "an integer")

    def scores(self, model, targets, tensors, tokenizer):
        g = torch.Generator().manual_seed(self.seed)
        out = {key: torch.rand(p.values.shape, generator=g, dtype=torch.float64) for key, p in tensors.items()}
        return out, {"seed": self.seed}
