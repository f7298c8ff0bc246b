"""`defense=safelora`: SafeLoRA (Hsu et al. 2024), following IBM/SafeLoRA model.py: after fine-tuning, project
the update of each weight matrix that leaves the alignment subspace back onto it. `safelora_project` maps dicts of dW
to dicts of dW; `SafeLoRA` applies it at the end of fit (safety_units.defenses.posthoc).

The code's default (config.py SafeLoRAConfig) is select_layers_type="number" with num_proj_layers=10: 10 of the
LoRA-adapted matrices of Llama-2-7B. The repository does not fix the adapted modules (get_aligned_matrix takes the
PEFT model's target_modules); the PEFT model of its usage example (model.py, "finetuned_models/samsumBad-7b-fp16-peft")
follows Qi et al. (2023)'s llama-recipes fine-tune (LLM-Tuning-Safety/LLMs-Finetuning-Safety, llama2/configs:
training.py's output_dir "finetuned_models", samsum_dataset), whose LoRA (peft.py lora_config) adapts q_proj and
v_proj: 2 x 32 layers = 64 matrices. `num_layers: auto` keeps that share on this model: max(1, round(10 * n_trained /
64)), n_trained the matrices whose update is non-zero (SmolLM2-135M fully fine-tuned: 210 -> 33).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from safety_units.defenses.posthoc import PostHocDefense, adapted, checked_number, target_weights
from safety_units.models.lora import ADAPTER
from safety_units.models.loading import load_model
from safety_units.utils.errors import ConfigError, ModelError


OFFICIAL_NUM_LAYERS = 10  # config.py num_proj_layers
OFFICIAL_ADAPTED = 64  # Llama-2-7B's q_proj + v_proj (32 layers): the matrices the code's 10 are taken from


def resolve_num_layers(num_layers: int | str, n_trained: int) -> int:
    """`auto`: the code's share of the adapted matrices, max(1, round(10 * n_trained / 64)) (half rounded up); an
    integer: itself."""
    if num_layers == "auto":
        return max(1, (2 * OFFICIAL_NUM_LAYERS * n_trained + OFFICIAL_ADAPTED) // (2 * OFFICIAL_ADAPTED))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be 'auto' or an integer >= 1, got {num_layers!r}")
    return num_layers


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
                     threshold: float = 0.5, select: str = "number",
                     num_layers: int | str = "auto") -> tuple[dict[str, Tensor], dict]:
    """SafeLoRA (Hsu et al. 2024), following IBM/SafeLoRA model.py (`get_aligned_matrix`, `projected_weighted`).

    Per matrix: C = V V^T / ||V||_F (V = aligned - base), cos = cosine(C dW, dW) flattened; dW <- C dW on the
    `num_layers` lowest-cos matrices (select="number", the code's default; `auto`: resolve_num_layers over the
    matrices in `delta`), or where cos <= threshold (select="threshold"). Deviation kept: with select="number" the
    code projects every matrix with cos <= its num_layers-th smallest cos (more on ties) and rounds cos to 5
    decimals first; here exactly min(num_layers, n) are projected, ties by dict order (a fixed count, also when
    several matrices tie at cos 0). The code projects LoRA's B (B <- C B); with dW = s B A, C dW = s (C B) A, so
    projecting the merged update is the same thing, and it also applies to full fine-tuning. Computed on each dW's
    device. Returns the new dW (unprojected ones are the same tensors) and {cos: {name: cos}, projected: [names],
    n_projected, threshold, select, num_layers, num_layers_resolved (None for select="threshold"),
    empty_alignment: [names with V = 0]}.
    """
    if select not in ("threshold", "number"):
        raise ValueError(f"select must be 'threshold' or 'number', got {select!r}")
    resolved = resolve_num_layers(num_layers, len(delta)) if select == "number" else None
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
        chosen = sorted(delta, key=lambda n: cos[n])[:resolved]  # sorted() is stable: ties in dict order
        thr = max((cos[n] for n in chosen), default=float("nan"))
    out = dict(delta)
    for name in chosen:  # C dW recomputed, not kept for every matrix: that would double the memory
        out[name] = projected(name).to(delta[name].dtype)
    empty = [n for n in delta if torch.equal(aligned[n], base[n].to(aligned[n].device, aligned[n].dtype))]
    report = {"cos": cos, "projected": [n for n in delta if n in set(chosen)], "n_projected": len(chosen),
              "threshold": thr, "select": select, "num_layers": num_layers, "num_layers_resolved": resolved,
              "empty_alignment": empty}
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

    def __init__(self, name: str = "safelora", stage: str = "post", select: str = "number",
                 threshold: float = 0.5, num_layers: int | str = "auto", base: dict | None = None):
        super().__init__(name, stage)
        if select not in ("threshold", "number"):
            raise ConfigError(f"defense.select must be 'threshold' or 'number', got {select!r}.")
        if base is None:
            raise ConfigError("defense.base: defense=safelora needs the aligned model's base model (a model config, "
                              "e.g. model@defense.base=hf defense.base.path=<dir>).")
        self.select, self.base = select, base
        self.threshold = float(checked_number(threshold, "threshold", False, "a number"))
        self.num_layers = num_layers if num_layers == "auto" else \
            checked_number(num_layers, "num_layers", True, "'auto' or an integer >= 1", lambda v: v >= 1)

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
        chosen = f"{r['num_layers_resolved']} lowest-cos" if r["select"] == "number" else "threshold"
        return (f"defense=safelora: projected {r['n_projected']}/{r['trained']} weight updates onto the alignment "
                f"subspace (select={r['select']}: {chosen}, cos <= {r['threshold']:.4g})")
