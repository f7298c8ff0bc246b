"""`scoring=mask`: a learned unit mask -- which few units must go for the model to stop refusing.

One gate per unit (the units of the unit map: MLP channels and attention output channels, or heads with
units.heads=true), multiplying the unit's activation (a head: its head_dim channels) at the input of down_proj /
o_proj. The gate is 1 - sigmoid(r_j / temperature): r_j is a learned
"remove" logit, started at `init_logit` (every gate open). The weights stay frozen; only r trains, with Adam:

    loss = refusal_weight * relu(LO_refusal - target_logodds)  break refusal: its log-odds down to a target
         + kl_weight      * KL(p_unmasked || p_masked)         keep utility: benign responses as the unmasked model
         + sparsity_weight * mean_j sigmoid(r_j / temperature)  remove few units (an L1 penalty on the removal)

* LO_refusal: the mean log-odds, log p - log(1 - p), of the safety calibration set's response tokens -- the
  refusals -- over the decision window (the last prompt position and the next `decision_tokens`), where a model
  refuses or complies. Log-odds, not NLL: an aligned model refuses with p ~ 1, where the NLL's gradient (1 - p)
  vanishes and the sparsity penalty would win by default; the log-odds' gradient in the refusal token's logit is
  1 at any p. The hinge bounds the objective: once the refusal's log-odds reach `target_logodds`, only the other
  two terms act, so it cannot run away by destroying the model.
* KL: per response token of the utility set (benign prompts with answers) -- each row's first `kl_tokens` (32:
  where an answer's course is set, at a third of the cost of whole answers) -- against the unmasked model's
  distribution computed in the same step (no stored logits: memory O(units) plus one model and one batch).
* Each harmful batch is cut after its decision window (scoring.truncate_to: exact for a causal LM), so a step
  costs a forward and backward over the prompts, not over the whole refusals.
* Defaults (conf/scoring/mask.yaml) and why: `target_logodds` -2 (the refusal's tokens at p < 0.12: no longer the
  likely continuation); `kl_weight` 1 and `sparsity_weight` 2 put the three terms on one scale at the start (an
  aligned model's refusal sits at log-odds +5 or more, KL grows to about one nat when a useful unit goes, and the
  sparsity term is at most its weight); `temperature` 1 and `init_logit` -4 (gates at 0.98) keep gradients alive;
  60 steps of Adam at lr 0.1 move a logit by up to ~6 (from -4 to +2, removal 0.88: a unit can cross the
  mask's 0.5 line); the ranking by logit, the score, settles earlier. ~7 s a step for SmolLM2-135M on one CPU
  core at 4 rows per batch.

The safety score is r_j after training (higher: the optimiser removed it to break refusal). The utility score is
the `activation` score on the utility set, as for atp / delta / refusal_direction. The unit map's metadata records
the mask the optimiser reached (units with a removal probability >= 0.5, per kind) and the final loss terms.
Seeded (`seed`: the order of the batches) and resumable: attribute.py saves the optimisation to
<run dir>/mask_state.pt every `checkpoint_every` steps, and a rerun into the same run dir continues from it.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safety_units.attribution.scorer import Scorer, ScoringRun
from safety_units.attribution.scoring import decision_positions, first_response_positions, truncate_to
from safety_units.models.forward import eval_mode, frozen_weights, head_logits, hidden_states, response_token_nll
from safety_units.units.groups import UnitGroup, tap
from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)

DEFAULTS = {"steps": 60, "lr": 0.1, "temperature": 1.0, "init_logit": -4.0, "target_logodds": -2.0,
            "refusal_weight": 1.0, "kl_weight": 1.0, "sparsity_weight": 2.0, "kl_tokens": 32, "seed": 0}


def _check(settings: dict) -> dict:
    s = DEFAULTS | {k: v for k, v in settings.items() if k in DEFAULTS and v is not None}
    for key in ("steps", "kl_tokens"):
        if int(s[key]) < 1:
            raise ConfigError(f"scoring.{key} must be >= 1, got {s[key]}.")
    for key in ("lr", "temperature"):
        if float(s[key]) <= 0:
            raise ConfigError(f"scoring.{key} must be > 0, got {s[key]}.")
    for key in ("refusal_weight", "kl_weight", "sparsity_weight"):
        if float(s[key]) < 0:
            raise ConfigError(f"scoring.{key} must be >= 0, got {s[key]}.")
    return s


@contextlib.contextmanager
def unit_gates(groups: list[UnitGroup], keep: Callable[[UnitGroup], torch.Tensor | None]):
    """Inside the block, each group's units are multiplied by `keep(group)` ([n], one factor per unit; None: that
    pass leaves the group alone) at the input of its out module (down_proj / o_proj / c_proj / fc2 ...): a head's
    factor covers its head_dim channels. A gate of 0 removes the unit's write as ablating its out column does."""
    def gate(g: UnitGroup):
        def hook(x, tokens, start):
            factor = keep(g)
            if factor is None:
                return None
            return x * g.per_channel(factor)[start:start + x.shape[-1]].to(x.dtype)
        return hook

    handles = [tap(g, gate(g)) for g in groups]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _benign_kl(model, batch: dict, gates: dict, kl_tokens: int) -> torch.Tensor:
    """Mean KL(unmasked || masked) over each row's first `kl_tokens` response tokens; the unmasked pass (gates["on"]
    False) runs first, without grad."""
    batch, positions = truncate_to(batch, first_response_positions(batch, kl_tokens))
    keep = positions[:, :-1] & (batch["labels"][:, 1:] != -100)
    if not keep.any():
        return torch.zeros((), device=batch["input_ids"].device)
    gates["on"] = False
    try:
        with torch.no_grad():
            h = hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1][keep]
            ref = torch.log_softmax(head_logits(model, h), dim=-1)
    finally:
        gates["on"] = True
    h = hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1][keep]
    ours = torch.log_softmax(head_logits(model, h), dim=-1)
    return (ref.exp() * (ref - ours)).sum(dim=-1).mean()


def _save_state(path: Path, step: int, settings: dict, logits: dict, opt, order: random.Random, terms: dict) -> None:
    """The optimisation so far (gates, Adam moments, the batch order's state), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, "settings": settings, "logits": {k: v.detach().cpu() for k, v in logits.items()},
                "opt": opt.state_dict(), "order": order.getstate(), "terms": terms}, tmp)
    os.replace(tmp, path)


def _resume(path: Path | None, settings: dict, logits: dict, opt, order: random.Random) -> tuple[int, dict]:
    """(the step to start from, the loss terms saved with it): a saved state of the same settings and units is
    loaded (gates, Adam, batch order); otherwise (0, {})."""
    if not path or not Path(path).is_file():
        return 0, {}
    state = torch.load(path, weights_only=False)
    same = {k: v for k, v in state["settings"].items() if k != "steps"} == \
        {k: v for k, v in settings.items() if k != "steps"}  # more steps: the run continues
    if not same or set(state["logits"]) != set(logits) or \
            any(state["logits"][k].shape != v.shape for k, v in logits.items()):
        log.warning("scoring=mask: %s was saved with other settings or units; starting from step 0", path)
        return 0, {}
    with torch.no_grad():
        for k, v in logits.items():
            v.copy_(state["logits"][k].to(v.device))
    opt.load_state_dict(state["opt"])
    order.setstate(state["order"])
    log.info("scoring=mask: resuming from step %d of %d (%s)", state["step"], settings["steps"], path)
    return int(state["step"]), dict(state.get("terms") or {})


def mask_scores(model, groups: list[UnitGroup], harmful: list[dict], benign: list[dict], decision_tokens: int = 4,
                settings: dict | None = None, progress: bool = True, desc: str = "mask",
                state_path: str | Path | None = None,
                checkpoint_every: int = 25) -> tuple[dict[str, torch.Tensor], dict]:
    """(the learned removal logits per unit group, what the optimiser reached) -- see the module docstring.

    With `state_path`, the optimisation is saved there every `checkpoint_every` steps and a rerun resumes from it
    (bit-identical to an uninterrupted run: the gates, Adam's moments and the batch order are restored)."""
    state_path = Path(state_path) if state_path else None
    s = _check(dict(settings or {}))
    if not harmful or not benign:
        raise ConfigError("scoring=mask needs safety (refusal) and utility calibration batches.")
    device = next(model.parameters()).device
    temp = float(s["temperature"])
    logits = {g.key: torch.full((g.n,), float(s["init_logit"]), device=device, requires_grad=True) for g in groups}

    gates = {"on": True}

    def keep(g: UnitGroup) -> torch.Tensor | None:
        return 1.0 - torch.sigmoid(logits[g.key] / temp) if gates["on"] else None

    opt = torch.optim.Adam(list(logits.values()), lr=float(s["lr"]))
    order = random.Random(int(s["seed"]))
    start, terms = _resume(state_path, s, logits, opt, order)  # terms: the last step's, also when none is left
    with unit_gates(groups, keep), eval_mode(model), frozen_weights(model), torch.enable_grad():
        for step in tqdm(range(start, int(s["steps"])), desc=desc, disable=not progress, leave=False,
                         initial=start, total=int(s["steps"])):
            hb = {k: v.to(device) for k, v in order.choice(harmful).items()}
            bb = {k: v.to(device) for k, v in order.choice(benign).items()}
            hb, window = truncate_to(hb, decision_positions(hb, decision_tokens))
            nll, _ = response_token_nll(model, hb, positions=window)
            # log p - log(1 - p); 1 - p from expm1 (exact near p = 1), nll floored so that p = 1 gives no nan
            logodds = -nll - torch.log(-torch.expm1(-nll.clamp(min=1e-6)))
            refusal = torch.relu(logodds.mean() - float(s["target_logodds"])) if nll.numel() else nll.sum()
            kl = _benign_kl(model, bb, gates, int(s["kl_tokens"]))
            removal = torch.cat([torch.sigmoid(v / temp) for v in logits.values()])
            loss = float(s["refusal_weight"]) * refusal + float(s["kl_weight"]) * kl + \
                float(s["sparsity_weight"]) * removal.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            terms = {"refusal_logodds": float(logodds.detach().mean()) if nll.numel() else None,
                     "kl": float(kl.detach()), "removed_share": float(removal.detach().mean()),
                     "loss": float(loss.detach())}
            if state_path and checkpoint_every and (step + 1) % checkpoint_every == 0:
                _save_state(state_path, step + 1, s, logits, opt, order, terms)
    removed = {g.key: int((torch.sigmoid(logits[g.key] / temp) >= 0.5).sum()) for g in groups}
    kinds = sorted({k.split(".")[0] for k in removed})
    info = {"mask_units": {kind: sum(v for k, v in removed.items() if k.startswith(kind + ".")) for kind in kinds},
            "final": terms, "settings": s}
    return {k: v.detach().float().cpu() for k, v in logits.items()}, info


class MaskScorer(Scorer):
    """Safety: the learned removal logits (the optimiser's settings: DEFAULTS' keys; the reached mask is recorded in
    the unit map's metadata `mask`); utility: `activation` on the utility set, or 0 with utility=none (units then
    rank by the removal logit alone). With a run dir (run.state_dir), resumable from its mask_state.pt."""

    def __init__(self, method: str, tokens: str = "all", decision_tokens: int = 4, utility: str = "activation",
                 checkpoint_every: int = 25, **settings):
        super().__init__(method, tokens, decision_tokens)
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"scoring.{unknown[0]} is not a setting of scoring={method}; its optimiser settings "
                              f"are {sorted(DEFAULTS)}.")
        if utility not in ("activation", "none"):
            raise ConfigError(f"scoring.utility must be activation or none, got {utility!r}.")
        self.settings, self.utility_score = _check(settings), utility
        self.checkpoint_every = int(checkpoint_every or 0)

    def safety(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        scores, run.metadata["mask"] = mask_scores(
            run.model, run.groups, run.batches("safety"), run.batches("utility"), self.decision_tokens,
            self.settings, desc=self.desc("safety"),
            state_path=run.state_dir / "mask_state.pt" if run.state_dir else None,
            checkpoint_every=self.checkpoint_every)
        return scores

    def utility(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        if self.utility_score == "none":
            return {g.key: torch.zeros(g.n) for g in run.groups}
        return super().utility(run)
