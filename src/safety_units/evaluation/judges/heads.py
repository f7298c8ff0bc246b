"""The classifiers on a judge's features: `logistic` (class-balanced L2 logistic regression, judges.probe) and `mlp`
(one hidden layer, class-balanced, weight decay, full-batch Adam for a fixed number of steps: deterministic for a
seed). Each fit returns a dict of tensors -- what the judges cache as safetensors -- whose `kind` entry says which
head it is (0 logistic, 1 mlp), so `probability` needs nothing else.
"""

from __future__ import annotations

import torch

from safety_units.evaluation.judges.probe import fit_logistic, probe_probability
from safety_units.utils.errors import ConfigError

HEADS = ("logistic", "mlp")


def fit_head(kind: str, x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, hidden: int = 256, steps: int = 300,
             lr: float = 1e-3, dropout: float = 0.2, seed: int = 0) -> dict[str, torch.Tensor]:
    if kind == "logistic":
        return {**fit_logistic(x, y, l2=l2), "kind": torch.tensor([0])}
    if kind == "mlp":
        return {**fit_mlp(x, y, hidden, steps, lr, l2, dropout, seed), "kind": torch.tensor([1])}
    raise ConfigError(f"harm_judge.head must be one of {HEADS}, got {kind!r}.")


def fit_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, steps: int, lr: float, l2: float, dropout: float,
            seed: int) -> dict[str, torch.Tensor]:
    """Standardised features -> Linear(hidden) -> GELU -> dropout -> Linear(1), class-balanced BCE + l2 * ||W||^2."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z, yf = (x - mean) / std, y.float()
    pos = yf.mean().clamp(1e-6, 1 - 1e-6)
    weight = torch.where(yf > 0, 0.5 / pos, 0.5 / (1 - pos))
    gen = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(x.shape[1], hidden, generator=gen) / x.shape[1] ** 0.5).requires_grad_(True)
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, generator=gen) / hidden ** 0.5).requires_grad_(True)
    b2 = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=lr)
    for _ in range(steps):
        keep = (torch.rand(z.shape[0], hidden, generator=gen) >= dropout).float() / (1 - dropout)
        logits = (torch.nn.functional.gelu(z @ w1 + b1) * keep) @ w2 + b2
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, yf, reduction="none")).mean()
        loss = loss + l2 * ((w1 * w1).sum() + (w2 * w2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"w1": w1.detach(), "b1": b1.detach(), "w2": w2.detach(), "b2": b2.detach(), "mean": mean, "std": std}


def probability(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """p(positive) of a fitted head for features x (a probe cached before heads existed is a logistic one)."""
    if "kind" not in params or int(params["kind"][0]) == 0:
        return probe_probability(x, params)
    z = (x - params["mean"]) / params["std"]
    return torch.sigmoid(torch.nn.functional.gelu(z @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"])
