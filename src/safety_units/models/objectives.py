"""`objective=`: what an alignment run optimises -- Jain et al.'s three safety fine-tuning methods (arXiv 2407.10264).

Each is a class named by its config's `_target_` (conf/objective/*.yaml) with `loss(module, batch)` and the data
kind it `needs` (safety_units.data.pairs: preference | unlearning; None: plain (prompt, response) pairs).

* `sft` (unset = sft): `Objective`, the base: the language-model loss on (prompt, response) pairs.
* `dpo` (Rafailov et al. 2023): on preference pairs (data=preference: chosen and rejected answers to one prompt),
      L = -log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]),
  log-probabilities summed over the response tokens; the reference is the frozen starting model, whose
  log-probabilities are computed once before training (safety_units.data.pairs), so no second model is held and every
  trainer strategy works. At the reference the loss is log 2.
* `unlearning`: NPO (Zhang et al. 2024, "Negative Preference Optimization") on harmful completions (the forget
  rows of data=unlearning) plus the language-model loss on benign pairs (the retain rows):
      L = (2 / beta) * mean_forget log(1 + (pi(y|x) / ref(y|x))^beta) + retain_weight * NLL_retain.
  Chosen over plain gradient ascent because its forget term is bounded below by 0 and its gradient vanishes as
  pi(y|x) -> 0: gradient ascent's -NLL is unbounded and diverges silently once the completions are unlikely
  (Zhang et al. measure the collapse). Jain et al.'s unlearning is gradient ascent on harmful completions with a
  retain loss; NPO is its bounded form (NPO -> gradient ascent as beta -> 0).

Each objective is one loss, so its gradient passes the freeze masks' hooks like the plain loss: frozen entries stay
exact under every `freeze=`, `adapter=` and strategy (tests/models/test_objectives.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safety_units.models.forward import response_token_nll
from safety_units.utils.config import instantiate
from safety_units.utils.errors import ConfigError

PAIR_KEYS = ("input_ids", "attention_mask", "labels")


def token_and_sequence_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(every response token's NLL, the row of each, each row's summed response log-probability)."""
    tok_nll, counts = response_token_nll(model, {k: batch[k] for k in PAIR_KEYS})
    row = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    logp = -torch.zeros(len(counts), dtype=tok_nll.dtype, device=tok_nll.device).index_add(0, row, tok_nll)
    return tok_nll, row, logp


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Per row: the summed log-probability of its response tokens (labels != -100)."""
    return token_and_sequence_nll(model, batch)[2]


class Objective:
    """objective=sft (or unset): the plain language-modelling loss, and what every objective has: its `name` (in
    error messages), the data kind it `needs` and the terms it logs (`last_terms`)."""

    needs: str | None = None

    def __init__(self, name: str = "sft"):
        self.name = name
        self.last_terms: dict[str, float] = {}

    def loss(self, module, batch: dict) -> torch.Tensor:
        return module.model(**batch).loss


class DPO(Objective):
    """Rows come interleaved: chosen, rejected, chosen, rejected, ... (safety_units.data.pairs.collate_rows)."""

    needs = "preference"

    def __init__(self, name: str = "dpo", beta: float = 0.1, sft_weight: float = 0.0):
        super().__init__(name)
        if beta <= 0:
            raise ConfigError(f"objective.beta must be > 0, got {beta}.")
        self.beta, self.sft_weight = float(beta), float(sft_weight)

    def loss(self, module, batch: dict) -> torch.Tensor:
        logp = sequence_logps(module.model, batch)
        ref = batch["ref_logps"].to(logp.dtype)
        margin = (logp[0::2] - ref[0::2]) - (logp[1::2] - ref[1::2])
        loss = -F.logsigmoid(self.beta * margin).mean()
        if self.sft_weight:  # optional NLL of the chosen answers (per token), as RPO adds
            n_tok = (batch["labels"][0::2] != -100).sum().clamp_min(1)
            loss = loss - self.sft_weight * logp[0::2].sum() / n_tok
        self.last_terms = {"train/dpo_margin": float(margin.detach().mean()),
                           "train/dpo_accuracy": float((margin.detach() > 0).float().mean())}
        return loss


class NPO(Objective):
    """objective=unlearning. Rows carry `forget` (1: a harmful completion to unlearn, 0: a benign pair to retain)."""

    needs = "unlearning"

    def __init__(self, name: str = "unlearning", variant: str = "npo", beta: float = 0.1, retain_weight: float = 1.0):
        super().__init__(name)
        if variant != "npo":
            raise ConfigError(f"objective.variant must be npo (bounded; see safety_units.models.objectives), "
                              f"got {variant!r}.")
        if beta <= 0:
            raise ConfigError(f"objective.beta must be > 0, got {beta}.")
        self.beta, self.retain_weight = float(beta), float(retain_weight)

    def terms(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(forget term, retain term); a term without rows in the batch is 0."""
        forget = batch["forget"].bool()
        tok_nll, row, logp = token_and_sequence_nll(model, batch)
        zero = tok_nll.sum() * 0.0
        f_term = zero
        if forget.any():
            log_ratio = logp[forget] - batch["ref_logps"][forget].to(logp.dtype)
            f_term = -(2.0 / self.beta) * F.logsigmoid(-self.beta * log_ratio).mean()
        retain_tok = forget.logical_not()[row]
        r_term = tok_nll[retain_tok].mean() if retain_tok.any() else zero
        return f_term, r_term

    def loss(self, module, batch: dict) -> torch.Tensor:
        f_term, r_term = self.terms(module.model, batch)
        self.last_terms = {"train/forget_loss": float(f_term.detach()), "train/retain_loss": float(r_term.detach())}
        return f_term + self.retain_weight * r_term


def build_objective(cfg) -> Objective:
    """The Objective of an `objective` config (None: sft, the plain LM loss)."""
    if cfg is None:
        return Objective()
    if "_target_" not in cfg:
        raise ConfigError(f"objective (name: {cfg.get('name')!r}) has no _target_: an objective config names the "
                          f"class that builds it, e.g. `_target_: safety_units.models.objectives.DPO` (see "
                          f"conf/objective/).")
    objective = instantiate(cfg, "objective")
    if not isinstance(objective, Objective):
        raise ConfigError(f"objective._target_ {cfg['_target_']!r} built a {type(objective).__name__}, not a "
                          f"safety_units.models.objectives.Objective.")
    return objective
