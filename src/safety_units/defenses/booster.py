"""`defense=booster`: attenuating harmful perturbation (Huang et al. 2025), following git-disl/Booster `trainer.py`,
BoosterAlignmentTrainer.training_step (`perturb_aware` off). Every term is part of one loss, so its gradient flows
through the freeze masks' hooks: frozen entries stay exact."""

from __future__ import annotations

import torch

from safety_units.defenses.base import BatchStream, Defense, trainable_params
from safety_units.utils.errors import ConfigError


class BoosterLoss:
    """Booster's update rule: loss = alignment loss + lamb * (h(w) - h(w - alpha * grad h(w) / ||grad h(w)||)), h
    the loss on harmful pairs and the step direction held constant: the model is trained so that one normalised step
    of harmful fine-tuning reduces the harmful loss as little as possible. Its gradient is grad L + lamb * (grad h(w)
    - grad h(w')), as in the code. grad h(w) enters through the surrogate sum(p * g) (same gradient, no second pass),
    and h(w') is a forward pass at the perturbed weights (torch.func.functional_call), so every term flows through
    the masks.
    """

    def __init__(self, harmful: BatchStream, lamb: float = 5.0, alpha: float = 0.1):
        if lamb < 0 or alpha < 0:
            raise ConfigError(f"defense.lamb and defense.alpha must be >= 0, got {lamb}, {alpha}.")
        self.harmful, self.lamb, self.alpha = harmful, float(lamb), float(alpha)
        self.last_terms: dict[str, float] = {}

    def loss(self, module, batch) -> torch.Tensor:
        from torch.func import functional_call

        model = module.model
        params = trainable_params(model)
        hb = self.harmful.next(batch["input_ids"].device)
        h = model(**hb).loss
        g = torch.autograd.grad(h, list(params.values()), allow_unused=True)
        g = {n: (torch.zeros_like(p) if gi is None else gi.detach()) for (n, p), gi in zip(params.items(), g)}
        norm = torch.sqrt(sum((gi.float() ** 2).sum() for gi in g.values())) + 1e-7
        perturbed = {n: p - (self.alpha / norm) * g[n] for n, p in params.items()}
        h_after = functional_call(model, perturbed, args=(), kwargs=hb).loss
        surrogate = sum((p * g[n]).sum() for n, p in params.items())  # its gradient is grad h(w)
        align = model(**batch).loss
        reduction = h.detach() - h_after
        loss = align + self.lamb * (reduction + surrogate - surrogate.detach())
        self.last_terms = {"defense/harmful_loss": float(h.detach()),
                           "defense/harmful_loss_reduction": float(reduction.detach())}
        return loss


class Booster(Defense):
    """Aligns with BoosterLoss on the `harmful` sources (three forward/backward passes a step). lamb = 5,
    alpha = 0.1: the defaults of its script/alignment/smooth_align.sh. batch_size / max_length of the harmful
    batches: null takes data.batch_size / data.max_length. The harmful set is disjoint from the fine-tuning attack's,
    as in the code (train.py: SupervisedDataset rows from 5000 for Booster, from 0 for the attack): conf/defense/
    booster.yaml reads the attack file's other prompt-hash half (hash_split [0, 0.5) vs data=task_mix's [0.5, 1))."""

    def __init__(self, name: str = "booster", stage: str = "align", lamb: float = 5.0, alpha: float = 0.1,
                 harmful: dict | None = None, batch_size: int | None = None, max_length: int | None = None):
        super().__init__(name, stage)
        self.lamb, self.alpha, self.harmful = lamb, alpha, harmful
        self.batch_size, self.max_length = batch_size, max_length

    def training_objective(self, tokenizer, data, seed):
        stream = BatchStream(self.harmful, tokenizer, batch_size=int(self.batch_size or data.batch_size),
                             max_length=int(self.max_length or data.max_length), seed=seed, where="defense.harmful")
        return BoosterLoss(stream, lamb=self.lamb, alpha=self.alpha)
