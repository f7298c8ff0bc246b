"""`scoring=contrast`: how much alignment moved each unit, by contrast with the base model.

As in the safety-neuron literature (activation contrasting between an aligned model and its base), on the same
calibration tokens:

    score_j = |mean_tokens x_j(model) - mean_tokens x_j(reference)| * ||W_out[:, j]||

x_j is unit j's activation at the input of down_proj / o_proj. The column norm is that of the model being
attributed: it turns an activation shift into the size of the change the unit writes into the residual stream,
which makes the scores comparable with `activation` and `wifv` (which weigh by the same column). The safety score
uses the safety calibration set, the utility score the utility set.

The reference model (`scoring.reference`, a model config; `scoring.reference_path=<dir>` for a local HF directory)
must have the same architecture, unit counts and vocabulary: the same token ids are fed to both. Memory is O(units):
the two runs share nothing but the per-unit float64 sums.
"""

from __future__ import annotations

from pathlib import Path

import torch

from safety_units.utils.config import instantiate
from safety_units.utils.errors import ConfigError, ModelError
from safety_units.models.loading import LoadedModel, load_hf
from safety_units.utils.fingerprints import model_fingerprint
from safety_units.utils.ranks import RankedLogger
from safety_units.attribution.scoring import activation_stats, column_norms
from safety_units.units.groups import UnitGroup, resolve_units, unit_counts

log = RankedLogger(__name__)


def load_reference(scoring_cfg, model_dtype: str, loaded: LoadedModel, names: dict | None = None) -> LoadedModel:
    """The base model of `scoring=contrast` / `scoring=delta`, checked against the model being attributed."""
    method = scoring_cfg.get("method", "contrast")
    path = scoring_cfg.get("reference_path")
    if path:
        if not Path(path).expanduser().is_dir():
            raise ConfigError(f"scoring.reference_path={path!r} is not a directory (a local Hugging Face model "
                              f"directory of the base model).")
        try:
            ref = load_hf(str(path), dtype=model_dtype)
        except ModelError as e:
            raise ConfigError(f"scoring.reference_path: {e}") from None
        key = "scoring.reference_path"
    elif scoring_cfg.get("reference") is not None:
        try:
            ref = instantiate(scoring_cfg.reference, "scoring.reference")
        except ModelError as e:
            raise ConfigError(f"scoring.reference: {e}") from None
        if not isinstance(ref, LoadedModel):
            raise ConfigError(f"scoring.reference._target_ must return a LoadedModel, got {type(ref).__name__}.")
        key = "scoring.reference"
    else:
        raise ConfigError(f"scoring={method} needs a base model: scoring.reference (a model config, e.g. "
                          f"model@scoring.reference=smollm2_135m) or scoring.reference_path=<local HF directory>.")
    ours, theirs = model_fingerprint(loaded.model), model_fingerprint(ref.model)
    for field in ("model_type", "num_layers"):
        if ours[field] != theirs[field]:
            raise ConfigError(f"{key}: the reference model has {field}={theirs[field]!r}, the model being attributed "
                              f"{ours[field]!r}; {method} needs the same architecture (its base model).")
    have, want = unit_counts(resolve_units(ref.model, names)), unit_counts(resolve_units(loaded.model, names))
    if have != want:
        raise ConfigError(f"{key}: the reference model has units {have}, the model being attributed {want}; "
                          f"{method} needs the same unit counts per layer.")
    if ref.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise ConfigError(f"{key}: the reference model's tokenizer differs from the attributed model's; both must "
                          f"read the same token ids.")
    if _same_weights(loaded.model, ref.model):
        raise ConfigError(f"{key} has the same weights as the model being attributed, so every {method} score "
                          f"would be 0; give its base model.")
    return ref


@torch.no_grad()
def _same_weights(a, b) -> bool:
    """Every parameter equal (stops at the first difference; the fingerprint hashes only a few tensors)."""
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y.to(x.device, x.dtype))
                                      for x, y in zip(pa, pb))


def contrast_scores(model, reference, groups: list[UnitGroup], ref_groups: list[UnitGroup], batches: list[dict],
                    tokens: str = "all", decision_tokens: int = 4, progress: bool = True,
                    desc: str = "contrast") -> dict[str, torch.Tensor]:
    """|mean x_j(model) - mean x_j(reference)| * ||W_out[:, j]|| (of `model`) per unit, on the same batches."""
    ours = activation_stats(model, groups, batches, tokens, decision_tokens, progress, f"{desc} (model)")
    device = next(model.parameters()).device
    reference.to(device)  # on the device only for its own pass: two large models need not fit at once
    try:
        theirs = activation_stats(reference, ref_groups, batches, tokens, decision_tokens, progress,
                                  f"{desc} (reference)")
    finally:
        reference.to("cpu")
    return {g.key: g.per_unit((ours[g.key].mean() - theirs[r.key].mean()).abs() * column_norms(g)).float()
            for g, r in zip(groups, ref_groups)}
