"""`scoring=snip`: Wei et al. 2024 style first-order SNIP, per unit.

    score_j = sum over batches b of sum_{w in unit j} |w * dL_b/dw|

with L_b the mean next-token loss on the response tokens predicted at the `scoring.tokens` positions (`all` and
`response` are the same here: only response tokens have targets; `decision`: the first decision_tokens + 1). The
same score on the safety set (safety) and on the utility set (utility). Each parameter's gradient is reduced to
per-unit sums the moment it is accumulated and then freed, so at most one dense gradient is alive at a time, and
with `gradient_checkpointing` activations are recomputed in backward. Dropout is off (eval mode), so scores are
deterministic.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

from safety_units.attribution.scorer import Scorer, ScoringRun
from safety_units.attribution.scoring import check_tokens, predicts_response, token_mask
from safety_units.models.forward import eval_mode, response_token_nll
from safety_units.units.groups import UnitGroup


def _response_loss(model, batch: dict, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens, as the HF loss (for SNIP)."""
    nll, _ = response_token_nll(model, batch, checkpointed=True, positions=positions)
    return nll.sum() / max(1, nll.numel())


def _checkpointing_api(model):
    """(enable, disable, currently_on) across transformers 5.x ("activation_") and 4.x ("gradient_") names."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        return (lambda: model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs),
                model.activation_checkpointing_disable, bool(getattr(model, "is_activation_checkpointing", False)))
    if hasattr(model, "gradient_checkpointing_enable"):
        return (lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs),
                model.gradient_checkpointing_disable, bool(getattr(model, "is_gradient_checkpointing", False)))
    return None, None, False


def _train_only_checkpointed(model) -> None:
    """Training mode for the modules that checkpoint (HF checkpoints only `if self.gradient_checkpointing and
    self.training`), eval mode for everything else: dropout stays off (GPT-2 has p=0.1), recomputation stays on."""
    model.eval()
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True  # this module only, not its children (its dropout submodules stay in eval)


def snip_scores(model, groups: list[UnitGroup], batches: Iterable[dict], progress: bool = True,
                gradient_checkpointing: bool = True, desc: str = "snip", tokens: str = "response",
                decision_tokens: int = 4) -> dict[str, torch.Tensor]:
    """sum_b sum_{w in unit} |w * dL_b/dw| per unit; loss on the response tokens predicted at the `tokens` positions
    (`all` and `response` are the same here: only response tokens have targets)."""
    check_tokens(tokens, decision_tokens)
    device = next(model.parameters()).device
    acc = {g.key: torch.zeros(g.n, dtype=torch.float64) for g in groups}
    owners = {}
    for g in groups:
        for s in g.slices:
            owners[id(s.param)] = (g.key, s)
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in owners)

    def reduce_and_free(p: torch.Tensor) -> None:
        key, s = owners[id(p)]
        prod = (p.detach().float() * p.grad.float()).abs()
        acc[key] += s.unit_values(prod).double().cpu()
        p.grad = None  # at most one dense gradient alive at a time

    handles = [p.register_post_accumulate_grad_hook(reduce_and_free) for p in model.parameters()
               if id(p) in owners]
    enable, disable, gc_was = _checkpointing_api(model)
    try:
        with eval_mode(model):  # no dropout: the scores of the model as it is used, and deterministic
            if gradient_checkpointing and enable is not None:
                enable()
                _train_only_checkpointed(model)
            for batch in tqdm(list(batches), desc=desc, disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                positions = token_mask(batch, tokens, decision_tokens)
                if not (predicts_response(batch["labels"]) & positions).any():
                    continue
                _response_loss(model, batch, positions).backward()
    finally:
        for h in handles:
            h.remove()
        if gradient_checkpointing and not gc_was and disable is not None:
            disable()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
    return {k: v.float() for k, v in acc.items()}


class SnipScorer(Scorer):
    """The SNIP score of each unit on the safety set (safety) and on the utility set (utility)."""

    def __init__(self, method: str, tokens: str = "response", decision_tokens: int = 4,
                 gradient_checkpointing: bool = True):
        super().__init__(method, tokens, decision_tokens)
        self.gradient_checkpointing = gradient_checkpointing

    def safety(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        return self.score(run, "safety")

    def utility(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        return self.score(run, "utility")

    def score(self, run: ScoringRun, which: str) -> dict[str, torch.Tensor]:
        return snip_scores(run.model, run.groups, run.batches(which), desc=self.desc(which),
                           gradient_checkpointing=self.gradient_checkpointing, tokens=self.tokens,
                           decision_tokens=self.decision_tokens)
