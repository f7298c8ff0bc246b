"""Per-unit importance scores, streamed over calibration batches with O(units) memory.

* `wifv` (FLAP-style, forward only): Var_tokens(x_j) * ||W_out[:, j]||^2, where x_j is unit j's activation at
  the input of down_proj / o_proj and W_out[:, j] the weight column it feeds.
* `activation` (Wanda-style, aggregated per unit): mean_tokens |x_j| * ||W_out[:, j]||.
* `snip` (Wei et al. 2024 style, first order): sum over batches of sum_{w in unit j} |w * dL_b/dw|, with the loss on
  response tokens only. Each parameter's gradient is reduced to per-unit sums the moment it is accumulated and then
  freed, so at most one dense gradient is alive at a time.

Activation statistics are float64 sums (count, sum, sum of squares, sum of |x|) per unit; nothing per weight
or per token is kept.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from tqdm.auto import tqdm

from safety_units.errors import ConfigError
from safety_units.models import eval_mode
from safety_units.units import UnitGroup

log = logging.getLogger(__name__)

METHODS = ("wifv", "activation", "snip")


def _column_sq_norms(g: UnitGroup) -> torch.Tensor:
    """||W_out[:, j]||^2 for each unit j (the out weight's unit dimension is g.out_weight.dim)."""
    w = g.out_weight.param.detach().float()
    other = 1 - g.out_weight.dim
    return (w * w).sum(dim=other).double().cpu()


def _decoder(model):
    """The transformer without its LM head: attribution needs unit activations, not 49k-way logits."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [batch, seq, hidden] without the LM head."""
    return _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """LM-head logits (float32) for selected hidden states, with the model's final soft-capping if it has one."""
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def response_token_nll(model, batch: dict, chunk: int = 64, checkpointed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL of every response token (labels != -100) and the number of them per row.

    Logits are computed only at response positions and in chunks, so the [batch, seq, vocab] tensor never exists;
    `checkpointed` recomputes each chunk in backward instead of keeping its logits (SNIP)."""
    from torch.utils.checkpoint import checkpoint

    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    h, y = hidden[:, :-1][keep], labels[keep]

    def nll(h_part, y_part):
        return torch.nn.functional.cross_entropy(head_logits(model, h_part), y_part, reduction="none")

    parts = [checkpoint(nll, h[i:i + chunk], y[i:i + chunk], use_reentrant=False) if checkpointed
             else nll(h[i:i + chunk], y[i:i + chunk]) for i in range(0, y.numel(), chunk)]
    return (torch.cat(parts) if parts else h.new_zeros(0)), keep.sum(dim=1)


def _response_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens, as the HF loss (for SNIP)."""
    nll, _ = response_token_nll(model, batch, checkpointed=True)
    return nll.sum() / max(1, nll.numel())


def _token_mask(batch: dict, tokens: str) -> torch.Tensor:
    if tokens == "all":
        return batch["attention_mask"].bool()
    if tokens == "response":
        return batch["labels"] != -100
    raise ConfigError(f"scoring.tokens must be 'all' or 'response', got {tokens!r}.")


class _ActivationStats:
    def __init__(self, n: int):
        self.count = 0
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.sumsq = torch.zeros(n, dtype=torch.float64)
        self.sumabs = torch.zeros(n, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:  # x: [tokens, n]
        x = x.double()
        self.count += x.shape[0]
        self.sum += x.sum(0).cpu()
        self.sumsq += (x * x).sum(0).cpu()
        self.sumabs += x.abs().sum(0).cpu()

    def variance(self) -> torch.Tensor:
        mean = self.sum / max(self.count, 1)
        return (self.sumsq / max(self.count, 1) - mean * mean).clamp_min(0.0)

    def mean_abs(self) -> torch.Tensor:
        return self.sumabs / max(self.count, 1)


@torch.no_grad()
def activation_scores(model, groups: list[UnitGroup], batches: Iterable[dict], method: str = "wifv",
                      tokens: str = "all", progress: bool = True, desc: str = "scoring") -> dict[str, torch.Tensor]:
    if method not in ("wifv", "activation"):
        raise ConfigError(f"activation_scores handles wifv and activation, not {method!r}.")
    device = next(model.parameters()).device
    stats = {g.key: _ActivationStats(g.n) for g in groups}
    current: dict = {}

    def make_hook(key):
        def hook(module, args):
            x = args[0]
            stats[key].add(x[current["mask"]].reshape(-1, x.shape[-1]))
        return hook

    handles = [g.out_module.register_forward_pre_hook(make_hook(g.key)) for g in groups]
    try:
        with eval_mode(model):
            for batch in tqdm(list(batches), desc=desc, disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                current["mask"] = _token_mask(batch, tokens)
                hidden_states(model, batch["input_ids"], batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for g in groups:
        colsq = _column_sq_norms(g)
        st = stats[g.key]
        if st.count == 0:
            raise ConfigError("no calibration tokens were scored (empty batches or token mask).")
        out[g.key] = (st.variance() * colsq if method == "wifv" else st.mean_abs() * colsq.sqrt()).float()
    return out


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


def snip_scores(model, groups: list[UnitGroup], batches: Iterable[dict], progress: bool = True,
                gradient_checkpointing: bool = True, desc: str = "snip") -> dict[str, torch.Tensor]:
    """sum_b sum_{w in unit} |w * dL_b/dw| per unit; loss on response tokens (labels != -100) only."""
    device = next(model.parameters()).device
    acc = {g.key: torch.zeros(g.n, dtype=torch.float64) for g in groups}
    owners = {}
    for g in groups:
        for s in g.slices:
            owners[id(s.param)] = (g.key, s.dim)
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in owners)

    def reduce_and_free(p: torch.Tensor) -> None:
        key, dim = owners[id(p)]
        prod = (p.detach().float() * p.grad.float()).abs()
        dims = [d for d in range(prod.ndim) if d != dim]
        acc[key] += (prod.sum(dim=dims) if dims else prod).double().cpu()
        p.grad = None  # at most one dense gradient alive at a time

    handles = [p.register_post_accumulate_grad_hook(reduce_and_free) for p in model.parameters()
               if id(p) in owners]
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    enable, disable, gc_was = _checkpointing_api(model)
    if gradient_checkpointing and enable is not None:
        enable()
        model.train()  # HF only checkpoints in training mode; these models have no dropout
    try:
        for batch in tqdm(list(batches), desc=desc, disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            if not (batch["labels"] != -100).any():
                continue
            _response_loss(model, batch).backward()
    finally:
        for h in handles:
            h.remove()
        if gradient_checkpointing and not gc_was and disable is not None:
            disable()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        model.train(was_training)
    return {k: v.float() for k, v in acc.items()}


def score_units(model, groups: list[UnitGroup], batches: list[dict], method: str, tokens: str = "all",
                progress: bool = True, desc: str = "", gradient_checkpointing: bool = True) -> dict[str, torch.Tensor]:
    if method not in METHODS:
        raise ConfigError(f"scoring.method must be one of {METHODS}, got {method!r}.")
    if method == "snip":
        return snip_scores(model, groups, batches, progress=progress, desc=desc or "snip",
                           gradient_checkpointing=gradient_checkpointing)
    return activation_scores(model, groups, batches, method, tokens=tokens, progress=progress, desc=desc or method)
