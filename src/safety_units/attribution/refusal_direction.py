"""`scoring=refusal_direction`: units that write along the refusal direction at the decision position.

The refusal direction of layer l (Arditi et al. 2024, difference of means) is

    r_l = mean_harmful h_l - mean_harmless h_l

where h_l is the residual stream at the output of block l (= the input of block l + 1), taken at the decision
position: the last prompt token, whose next-token prediction decides between refusing and complying. Harmful
prompts are the safety calibration prompts, harmless ones `calibration.harmless` (prompt-only).

A unit of block l writes its activation times its weight column W_out[:, j] into that stream, so its safety score
is how much it writes along the (unit-length) direction there:

    safety_j = |W_out[:, j] . r_l / ||r_l||| * mean_harmful |x_j|      (x_j at the decision position)

Its utility score is how much it writes at all on benign data, in any direction: the `activation` score on the
utility set, mean_tokens |x_j| * ||W_out[:, j]|| (tokens: `scoring.tokens`).

Memory is O(units + layers * hidden): float64 sums of the residual stream per block and of |x_j| per unit.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from safety_units.attribution.scorer import Scorer, ScoringRun
from safety_units.attribution.scoring import ActivationStats, decision_positions, stats_hook
from safety_units.models.forward import eval_mode, hidden_states
from safety_units.units.groups import UnitGroup, tap
from safety_units.units.layouts import decoder_layers
from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)


@torch.no_grad()
def decision_means(model, layers: torch.nn.ModuleList, batches: list[dict], groups: list[UnitGroup] | None = None,
                   progress: bool = True, desc: str = "refusal direction") -> tuple[torch.Tensor, dict]:
    """Mean residual stream at the output of every block, at the decision position: [num_layers, hidden] float64;
    with `groups`, also the activation statistics of their units there."""
    device = next(model.parameters()).device
    sums: list[torch.Tensor | None] = [None] * len(layers)
    stats = {g.key: ActivationStats(g.n * g.width) for g in groups or []}
    count, current = 0, {}

    def add_output(i):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            part = h[current["mask"]].double().sum(0).cpu()
            sums[i] = part if sums[i] is None else sums[i] + part
        return hook

    handles = [layer.register_forward_hook(add_output(i)) for i, layer in enumerate(layers)]
    handles += [tap(g, stats_hook(stats[g.key], current)) for g in groups or []]
    try:
        with eval_mode(model):
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                current["mask"] = decision_positions(batch, 0)  # one position per row: the last prompt token
                count += int(current["mask"].sum())
                hidden_states(model, batch["input_ids"], batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    if count == 0 or any(s is None for s in sums):
        raise ConfigError("refusal_direction: no decision positions were scored (empty calibration batches).")
    return torch.stack(sums) / count, stats


def refusal_directions(model, layers, harmful: list[dict], harmless: list[dict], groups: list[UnitGroup],
                       progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Difference-of-means direction per block output [num_layers, hidden] and the unit statistics on `harmful`."""
    mean_harmful, stats = decision_means(model, layers, harmful, groups, progress, "refusal direction (harmful)")
    mean_harmless, _ = decision_means(model, layers, harmless, None, progress, "refusal direction (harmless)")
    return mean_harmful - mean_harmless, stats


def refusal_direction_scores(model, layers, groups: list[UnitGroup], harmful: list[dict], harmless: list[dict],
                             progress: bool = True) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Safety scores |W_out[:, j] . r_l_hat| * mean |x_j| (decision position, harmful prompts), and ||r_l|| per
    block (reported: a layer whose direction is ~0 separates nothing)."""
    directions, stats = refusal_directions(model, layers, harmful, harmless, groups, progress)
    norms = directions.norm(dim=1)
    if (norms == 0).any():
        log.warning("refusal_direction: harmful and harmless prompts give the same mean residual stream at blocks "
                    "%s; their units score 0", (norms == 0).nonzero().flatten().tolist())
    unit_dirs = directions / norms.clamp_min(1e-30)[:, None]
    out = {}
    for g in groups:
        w = g.out_weight.channels_first().detach().double().cpu()  # [channels, hidden]
        along = (w @ unit_dirs[g.layer]).abs()
        out[g.key] = g.per_unit(along * stats[g.key].mean_abs()).float()
    return out, [round(float(n), 6) for n in norms]


class RefusalDirectionScorer(Scorer):
    """Safety: the write along the refusal direction (harmful vs calibration.harmless prompts), its per-block norms
    recorded in the unit map (refusal_direction_norms); utility: `activation` on the utility set."""
    calibration_sets = ("safety", "utility", "harmless")

    def safety(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        scores, run.metadata["refusal_direction_norms"] = refusal_direction_scores(
            run.model, decoder_layers(run.model, run.names), run.groups, run.batches("safety"),
            run.batches("harmless"))
        return scores
