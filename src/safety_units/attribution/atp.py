"""`scoring=atp`: attribution patching (Nanda 2023; Syed et al. 2023; Kramar et al. 2024, "AtP*").

A first-order estimate of what patching each unit's activation from harmless into harmful runs does to a refusal
metric, one forward and one backward pass per batch:

    safety_j = mean over harmful examples of | sum_{p in D} dm/dx_j(p) * (mu_j - x_j(p)) |

* m, the metric (`scoring.metric=refusal_logprob`): the log-probability of the aligned model's own refusal -- the
  response of each safety calibration example -- over its first `scoring.decision_tokens` + 1 tokens, where the
  model decides to refuse or comply. A refusal-carrying unit is one whose patch moves m.
* D: the decision window (the last prompt position and the next `decision_tokens`, as `scoring.tokens=decision`).
* mu_j: unit j's mean activation over the harmless prompts (`calibration.harmless`) at their last prompt token,
  the position where the harmless run decides. Harmful and harmless prompts differ in length, so the patch value
  is a mean, not a position-by-position copy (mean patching).
* x_j is the unit's activation at the input of down_proj / o_proj, as for every scorer here. The absolute value
  ranks units by the size of the estimated effect, either direction (as AtP ranks nodes).

AtP*'s correction re-computes attention patterns for query/key nodes, whose effect goes through the softmax and
saturates. These units are the MLP channels and the attention *output* channels (the inputs of o_proj, after the
softmax), so no unit's patch changes an attention pattern directly and the correction does not apply (a head unit,
units.heads, is patched at its output -- o_proj's input -- too: the softmax is upstream of the patch); its second
part (dropout of cancelling gradients) is not needed for per-channel scores summed in one pass.

Utility is the `activation` score on the utility set, as for refusal_direction and delta. Memory: one batch's unit
activations and their gradients (no parameter gradients: the weights do not require grad here).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from safety_units.attribution.scorer import Scorer, ScoringRun
from safety_units.attribution.scoring import activation_stats, decision_positions, truncate_to
from safety_units.models.forward import eval_mode, frozen_weights, response_token_nll
from safety_units.units.groups import UnitGroup, tap
from safety_units.utils.errors import ConfigError

METRICS = ("refusal_logprob",)


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"scoring.metric must be one of {METRICS}, got {metric!r}.")


def atp_scores(model, groups: list[UnitGroup], harmful: list[dict], harmless: list[dict], decision_tokens: int = 4,
               metric: str = "refusal_logprob", progress: bool = True, desc: str = "atp") -> dict[str, torch.Tensor]:
    """|sum over the decision window of dm/dx_j * (mu_j - x_j)|, averaged over harmful examples (float32 per unit).

    `harmful`: batches with the refusal responses as labels; `harmless`: prompt-only batches (labels all -100)."""
    check_metric(metric)
    means = activation_stats(model, groups, harmless, "decision", 0, progress, f"{desc} (harmless means)")
    device = next(model.parameters()).device
    mu = {g.key: means[g.key].mean().to(device=device, dtype=torch.float32) for g in groups}
    acc = {g.key: torch.zeros(g.n, dtype=torch.float64) for g in groups}
    seen = {}

    def capture(key):
        def observe(x, tokens, start):  # per expert for an expert group: its routed tokens
            x.retain_grad()
            seen.setdefault(key, []).append((x, tokens, start))
        return observe

    def leaf_embeddings(module, args, out):  # the graph starts here: every activation downstream gets a grad_fn
        return out.detach().requires_grad_(True)

    handles = [tap(g, capture(g.key)) for g in groups]
    handles.append(model.get_input_embeddings().register_forward_hook(leaf_embeddings))
    n_examples = 0
    try:
        with eval_mode(model), frozen_weights(model), torch.enable_grad():
            for batch in tqdm(list(harmful), desc=desc, disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                batch, window = truncate_to(batch, decision_positions(batch, decision_tokens))  # exact, cheaper
                nll, counts = response_token_nll(model, batch, positions=window)
                if nll.numel() == 0:
                    continue
                (-nll.sum()).backward()  # m summed over examples: each example's gradient is its own
                for g in groups:
                    effect = g.per_unit(_patch_effect(seen.get(g.key, []), window, mu[g.key], g.n * g.width))
                    rows = counts > 0  # a head's patch is all its channels at once: sum, then |.|
                    acc[g.key] += effect[rows].abs().double().sum(dim=0).cpu()
                n_examples += int((counts > 0).sum())
                seen.clear()
    finally:
        for h in handles:
            h.remove()
    if not n_examples:
        raise ConfigError("scoring=atp: no harmful calibration example has response tokens in its decision window; "
                          "the safety set needs responses (the refusals whose log-probability is the metric).")
    return {k: (v / n_examples).float() for k, v in acc.items()}


def _patch_effect(captured: list, window: torch.Tensor, mu: torch.Tensor, channels: int) -> torch.Tensor:
    """[batch, channels]: each example's first-order effect grad * (mu - x) summed over its window positions, from
    the tapped activations (all positions at once, or an expert's routed tokens)."""
    rows = window.reshape(-1).float()
    effect = torch.zeros(window.shape[0], channels, device=window.device)
    for x, tokens, start in captured:
        grad = x.grad if x.grad is not None else torch.zeros_like(x)  # an expert no scored position reached
        cols = slice(start, start + x.shape[-1])
        w = rows if tokens is None else rows[tokens]
        part = grad.float() * (mu[cols] - x.detach().float()) * w.unsqueeze(-1)
        if tokens is None:  # every position, in order
            effect[:, cols] += part.reshape(*window.shape, -1).sum(dim=1)
        else:
            effect[:, cols] += torch.zeros_like(effect[:, cols]).index_add_(0, tokens // window.shape[1], part)
    return effect


class AtpScorer(Scorer):
    """Safety: attribution patching toward the calibration.harmless means; utility: `activation` on the utility
    set (`tokens` is the utility score's positions; the patch reads the decision window)."""
    calibration_sets = ("safety", "utility", "harmless")

    def __init__(self, method: str, tokens: str = "all", decision_tokens: int = 4, metric: str = "refusal_logprob"):
        super().__init__(method, tokens, decision_tokens)
        check_metric(metric)
        self.metric = metric

    def safety(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        return atp_scores(run.model, run.groups, run.batches("safety"), run.batches("harmless"),
                          self.decision_tokens, self.metric, desc=self.desc("safety"))
