"""The machinery every scorer shares: token positions and per-unit activation statistics, O(units) memory.

* `activation_scores`, the forward-only scores of one set: `wifv` (FLAP-style, Var_tokens(x_j) * ||W_out[:, j]||^2,
  scoring=wifv) and `activation` (Wanda-style, aggregated per unit, mean_tokens |x_j| * ||W_out[:, j]||: scoring=
  activation, and the utility score of refusal_direction, delta, atp and mask). x_j is unit j's activation at the
  input of down_proj / o_proj and W_out[:, j] the weight column it feeds.
* (`attribution.one_set.score_units` runs wifv, activation or snip of one model on one set: drift, benchmarks.)

Which positions count (`scoring.tokens`): `all` (every attended token), `response` (the positions that *predict* a
response token: position i counts when token i+1 is a response token, so the last prompt position -- where the model
decides to refuse or comply -- is in and the last response token is out) or `decision` (the last prompt position and
the next `scoring.decision_tokens` positions).

Activation statistics are float64 sums (count, sum, sum of squares, sum of |x|) per unit; nothing per weight
or per token is kept. contrast.py and refusal_direction.py (a second model, a second prompt set) build on these sums.
The scorers themselves (the `scoring` config group) are the sibling modules; their interface is attribution.scorer.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

from safety_units.utils.errors import ConfigError
from safety_units.models.forward import eval_mode, hidden_states
from safety_units.utils.ranks import RankedLogger
from safety_units.units.groups import UnitGroup, tap

log = RankedLogger(__name__)

TOKENS = ("all", "response", "decision")


def _column_sq_norms(g: UnitGroup) -> torch.Tensor:
    """||W_out[:, j]||^2 for each channel j at the out module's input (an expert's down_proj columns per expert)."""
    w = g.out_weight.channels_first().detach().float()
    return (w * w).sum(dim=1).double().cpu()


def predicts_response(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: position i predicts a response token (labels[i + 1] != -100).

    The hidden state that decides response token t sits at position t - 1 (HF labels are unshifted)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def last_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: each row's last attended position (right or left padding)."""
    seq = attention_mask.shape[1]
    last = seq - 1 - attention_mask.flip(1).long().argmax(dim=1)
    return torch.nn.functional.one_hot(last, seq).bool() & attention_mask.bool()


def decision_positions(batch: dict, k: int) -> torch.Tensor:
    """The last prompt position (it predicts the first response token: refuse or comply) and the next k positions.

    Only a row's first k + 1 response-predicting positions count (calibration rows have one assistant turn); a
    prompt-only row (no response tokens) counts its last token, where the answer would start."""
    pred = predicts_response(batch["labels"])
    first = pred & (pred.cumsum(dim=1) <= k + 1)
    prompt_only = ~pred.any(dim=1, keepdim=True)
    return torch.where(prompt_only, last_token(batch["attention_mask"]), first)


def first_response_positions(batch: dict, n: int) -> torch.Tensor:
    """[batch, seq] bool: each row's first n response-predicting positions."""
    pred = predicts_response(batch["labels"])
    return pred & (pred.cumsum(dim=1) <= n)


def truncate_to(batch: dict, positions: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The batch and positions cut after the last position any row needs (and the label it predicts). Exact for a
    causal LM -- the logits at a position depend only on the tokens up to it -- and it saves the forward and
    backward over everything later (a refusal's decision window is its first few tokens)."""
    cols = torch.nonzero(positions.any(dim=0)).flatten()
    if cols.numel() == 0:
        return batch, positions
    end = min(int(cols.max()) + 2, positions.shape[1])  # position p predicts labels[p + 1]
    return {k: v[:, :end] for k, v in batch.items()}, positions[:, :end]


def check_tokens(tokens: str, decision_tokens: int) -> None:
    if tokens not in TOKENS:
        raise ConfigError(f"scoring.tokens must be one of {TOKENS}, got {tokens!r}.")
    if not isinstance(decision_tokens, int) or isinstance(decision_tokens, bool) or decision_tokens < 0:
        raise ConfigError(f"scoring.decision_tokens must be an integer >= 0, got {decision_tokens!r}.")


def token_mask(batch: dict, tokens: str, decision_tokens: int = 4) -> torch.Tensor:
    """[batch, seq] bool: the positions whose activations a score counts (`scoring.tokens`)."""
    check_tokens(tokens, decision_tokens)
    if tokens == "all":
        return batch["attention_mask"].bool()
    if tokens == "response":
        return predicts_response(batch["labels"])
    return decision_positions(batch, decision_tokens)


class ActivationStats:
    """Per-channel sums; the token count is per channel too (an expert's channels see only its routed tokens)."""

    def __init__(self, n: int):
        self.count = torch.zeros(n, dtype=torch.float64)
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.sumsq = torch.zeros(n, dtype=torch.float64)
        self.sumabs = torch.zeros(n, dtype=torch.float64)

    def add(self, x: torch.Tensor, start: int = 0) -> None:  # x: [tokens, channels start ... start + channels - 1]
        x, cols = x.double(), slice(start, start + x.shape[-1])
        self.count[cols] += x.shape[0]
        self.sum[cols] += x.sum(0).cpu()
        self.sumsq[cols] += (x * x).sum(0).cpu()
        self.sumabs[cols] += x.abs().sum(0).cpu()

    @property
    def tokens(self) -> int:
        """The most tokens any channel saw (0: nothing was scored)."""
        return int(self.count.max()) if self.count.numel() else 0

    def variance(self) -> torch.Tensor:
        mean = self.mean()
        return (self.sumsq / self.count.clamp_min(1) - mean * mean).clamp_min(0.0)

    def mean_abs(self) -> torch.Tensor:
        return self.sumabs / self.count.clamp_min(1)

    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)


def stats_hook(stats: ActivationStats, current: dict):
    """A tap (safety_units.units.groups.tap) that adds a unit group's activations at the positions current["mask"]
    selects ([batch, seq] bool, set per batch by the caller) to `stats`."""
    def observe(x, tokens, start):
        mask = current["mask"].reshape(-1)
        stats.add(x[mask if tokens is None else mask[tokens]], start)
    return observe


@torch.no_grad()
def activation_stats(model, groups: list[UnitGroup], batches: Iterable[dict], tokens: str = "all",
                     decision_tokens: int = 4, progress: bool = True, desc: str = "scoring") -> dict[str, ActivationStats]:
    """Running sums of every unit's activation (the input of down_proj / o_proj; an expert's channels over the
    tokens routed to it) at the `tokens` positions."""
    check_tokens(tokens, decision_tokens)
    device = next(model.parameters()).device
    stats = {g.key: ActivationStats(g.n * g.width) for g in groups}  # per channel; a head sums its own
    current: dict = {}

    handles = [tap(g, stats_hook(stats[g.key], current)) for g in groups]
    try:
        with eval_mode(model):
            for batch in tqdm(list(batches), desc=desc, disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                current["mask"] = token_mask(batch, tokens, decision_tokens)
                hidden_states(model, batch["input_ids"], batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    if any(st.tokens == 0 for st in stats.values()):
        raise ConfigError(f"no calibration tokens were scored (empty batches, or no positions for "
                          f"scoring.tokens={tokens!r}).")
    return stats


def activation_scores(model, groups: list[UnitGroup], batches: Iterable[dict], method: str = "wifv",
                      tokens: str = "all", decision_tokens: int = 4, progress: bool = True,
                      desc: str = "scoring") -> dict[str, torch.Tensor]:
    if method not in ("wifv", "activation"):
        raise ConfigError(f"activation_scores handles wifv and activation, not {method!r}.")
    stats = activation_stats(model, groups, batches, tokens, decision_tokens, progress, desc)
    out = {}
    for g in groups:
        colsq = _column_sq_norms(g)
        st = stats[g.key]
        out[g.key] = g.per_unit(st.variance() * colsq if method == "wifv" else st.mean_abs() * colsq.sqrt()).float()
    return out


def column_norms(g: UnitGroup) -> torch.Tensor:
    """||W_out[:, j]|| for each unit j (float64, CPU)."""
    return _column_sq_norms(g).sqrt()


