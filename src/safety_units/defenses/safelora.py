"""`defense=safelora`: SafeLoRA (Hsu et al. 2024), following IBM/SafeLoRA model.py: after fine-tuning, project
the update of each weight matrix that leaves the alignment subspace back onto it. `safelora_project` maps dicts of dW
to dicts of dW; `SafeLoRA` applies it at the end of fit (safety_units.defenses.posthoc)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from safety_units.defenses.posthoc import PostHocDefense, adapted, checked_number, target_weights
from safety_units.models.lora import ADAPTER
from safety_units.models.loading import load_model
from safety_units.utils.errors import ConfigError, ModelError


def alignment_matrix(aligned: Tensor, base: Tensor) -> Tensor:
    """C = V V^T / ||V||_F with V = W_aligned - W_base (float32; IBM/SafeLoRA model.py get_aligned_matrix). A zero V
    (the matrix did not change in alignment) gives C = 0: an empty alignment subspace, not 0/0."""
    v = aligned.float() - base.to(aligned.device).float()
    norm = torch.linalg.norm(v)
    return v @ v.T / norm if norm > 0 else torch.zeros(v.shape[0], v.shape[0], device=v.device)


def _cosine(a: Tensor, b: Tensor) -> float:  # flattened, float64; 0.0 when either is zero
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = torch.linalg.norm(a), torch.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def safelora_project(delta: dict[str, Tensor], aligned: dict[str, Tensor], base: dict[str, Tensor],
                     threshold: float = 0.5, select: str = "threshold",
                     num_layers: int = 10) -> tuple[dict[str, Tensor], dict]:
    """SafeLoRA (Hsu et al. 2024), following IBM/SafeLoRA model.py (`get_aligned_matrix`, `projected_weighted`).

    Per matrix: C = V V^T / ||V||_F (V = aligned - base), cos = cosine(C dW, dW) flattened; dW <- C dW on the
    matrices where cos <= threshold (select="threshold"), or on the `num_layers` lowest-cos ones (select="number";
    the code takes cos <= its num_layers-th smallest cos, which projects more on ties -- here ties go by dict order,
    so exactly min(num_layers, n) are projected; the code also rounds cos to 5 decimals, not done here). The code
    projects LoRA's B (B <- C B); with dW = s B A, C dW = s (C B) A, so projecting the merged update is the same
    thing, and it also applies to full fine-tuning. Computed on each dW's device. Returns the new dW (unprojected
    ones are the same tensors) and {cos: {name: cos}, projected: [names], n_projected, threshold, select,
    empty_alignment: [names with V = 0]}.
    """
    if select not in ("threshold", "number"):
        raise ValueError(f"select must be 'threshold' or 'number', got {select!r}")
    if select == "number" and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    missing = [n for n in delta if n not in aligned or n not in base]
    if missing:
        raise KeyError(f"safelora_project: no aligned / base weight for {missing}")

    def projected(name: str) -> Tensor:
        d = delta[name]
        return alignment_matrix(aligned[name].to(d.device), base[name].to(d.device)) @ d.float()

    cos = {name: _cosine(projected(name), delta[name]) for name in delta}
    if select == "threshold":
        chosen, thr = [n for n in delta if cos[n] <= threshold], float(threshold)
    else:
        chosen = sorted(delta, key=lambda n: cos[n])[:num_layers]  # sorted() is stable: ties in dict order
        thr = max((cos[n] for n in chosen), default=float("nan"))
    out = dict(delta)
    for name in chosen:  # C dW recomputed, not kept for every matrix: that would double the memory
        out[name] = projected(name).to(delta[name].dtype)
    empty = [n for n in delta if torch.equal(aligned[n], base[n].to(aligned[n].device, aligned[n].dtype))]
    report = {"cos": cos, "projected": [n for n in delta if n in set(chosen)], "n_projected": len(chosen),
              "threshold": thr, "select": select, "empty_alignment": empty}
    return out, report


def base_weights(base_cfg, start: dict[str, Tensor]) -> dict[str, Tensor]:
    """SafeLoRA's W_base: the target weights of the `defense.base` model config, checked against W_aligned."""

    try:
        model = load_model(base_cfg).model
    except (ModelError, ConfigError) as e:
        raise ConfigError(f"defense.base: {e}") from None
    base = {n: m.weight.detach() for n, m in target_weights(model).items()}
    bad = [n for n in start if n not in base or base[n].shape != start[n].shape]
    if bad:
        have = tuple(base[bad[0]].shape) if bad[0] in base else "absent"
        raise ConfigError(f"defense.base: the base model's weights do not match: {bad[0]} is {have} there, "
                          f"{tuple(start[bad[0]].shape)} here.")
    if all(torch.equal(base[n], start[n].to(base[n].dtype)) for n in start):
        raise ConfigError("defense.base has the same weights as the model that was fine-tuned, so the alignment "
                          "matrix V = W_aligned - W_base is 0; give the base model of the aligned model.")
    return base


class SafeLoRA(PostHocDefense):
    """Per weight matrix: C = V V^T / ||V||_F with V = W_aligned - W_base (`base`: a model config of the aligned
    model's base, loaded at the end of fit); the update dW becomes C dW where cos(C dW, dW) <= threshold
    (select=threshold) or on the num_layers lowest-cos matrices (select=number). Code defaults: 0.5, 10.
    * full weights: W <- W_aligned + C dW on the projected matrices; every other weight stays bit-identical.
    * LoRA: lora_B <- C lora_B on the projected modules (exactly C dW: the adapter carries it).
    """

    count_key = "n_projected"

    def __init__(self, name: str = "safelora", stage: str = "post", select: str = "threshold",
                 threshold: float = 0.5, num_layers: int = 10, base: dict | None = None):
        super().__init__(name, stage)
        if select not in ("threshold", "number"):
            raise ConfigError(f"defense.select must be 'threshold' or 'number', got {select!r}.")
        if base is None:
            raise ConfigError("defense.base: defense=safelora needs the aligned model's base model (a model config, "
                              "e.g. model@defense.base=hf defense.base.path=<dir>).")
        self.select, self.base = select, base
        self.threshold = float(checked_number(threshold, "threshold", False, "a number"))
        self.num_layers = checked_number(num_layers, "num_layers", True, "an integer >= 1", lambda v: v >= 1)

    def edit(self, model: nn.Module, targets: dict[str, nn.Module], start: dict[str, Tensor],
             delta: dict[str, Tensor], tokenizer, device) -> dict:
        base = base_weights(self.base, start)
        new, report = safelora_project(delta, start, base, self.threshold, self.select, self.num_layers)
        for n in report["projected"]:
            mod, s = targets[n], start[n]
            if adapted(mod):
                w = mod.get_base_layer().weight
                if not torch.equal(w.detach().cpu(), s.to(w.dtype)):  # C (s B A) = s (C B) A needs W = W_aligned
                    raise RuntimeError(f"safelora: the base weight of {n} moved during training; cannot project B.")
                b = mod.lora_B[ADAPTER].weight
                cm = alignment_matrix(s.to(device), base[n].to(device))
                b.copy_((cm @ b.to(device, torch.float32)).to(b.device, b.dtype))
            else:
                w = mod.weight
                w.copy_((s.to(device, torch.float32) + new[n]).to(w.device, w.dtype))
        return report

    def summary_line(self, r: dict) -> str:
        return (f"defense=safelora: projected {r['n_projected']}/{r['trained']} weight updates onto the alignment "
                f"subspace (select={r['select']}, cos <= {r['threshold']:.4g})")
