"""`defense=shrink`: the matched-drift control of the defense benchmark (issue 36) -- the fine-tune's own update,
scaled down to the size of another defense's update: W <- W_aligned + c dW with c = target / ||dW||_F over the
decoder's target matrices. A proximal or post-hoc defense that only shrinks the update is then no better than this;
one that picks what to keep is."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from safety_units.defenses.posthoc import PostHocDefense, adapted, checked_number
from safety_units.models.lora import ADAPTER
from safety_units.utils.errors import ConfigError


def target_norm(norm_of: str) -> float:
    """`train.delta_norm` of a benchmark stage's point.json (the norm to match)."""
    path = Path(norm_of)
    if not path.is_file():
        raise ConfigError(f"defense.norm_of: {path} does not exist (the matched defense's stage has not finished).")
    value = (json.loads(path.read_text()).get("train") or {}).get("delta_norm")
    if value is None:
        raise ConfigError(f"defense.norm_of: {path} has no train.delta_norm.")
    return float(value)


class Shrink(PostHocDefense):
    """Scales the update to `norm` (a number), or to the `train.delta_norm` recorded in the point.json `norm_of`.
    A scale above 1 is capped at 1: the control never grows the update."""

    count_key = "scale"

    def __init__(self, name: str = "shrink", stage: str = "post", norm: float | None = None,
                 norm_of: str | None = None):
        super().__init__(name, stage)
        if norm is not None and norm_of is not None:
            raise ConfigError("defense=shrink takes one of defense.norm and defense.norm_of, not both.")
        self.norm = None if norm is None else float(checked_number(norm, "norm", False, ">= 0", lambda v: v >= 0))
        self.norm_of = norm_of

    def edit(self, model: nn.Module, targets: dict[str, nn.Module], start: dict[str, Tensor],
             delta: dict[str, Tensor], tokenizer, device) -> dict:
        if self.norm is None and self.norm_of is None:
            raise ConfigError("defense=shrink needs defense.norm (a number) or defense.norm_of (a benchmark stage's "
                              "point.json): the norm to scale the update to.")
        goal = self.norm if self.norm is not None else target_norm(self.norm_of)
        total = sum(float(d.double().pow(2).sum()) for d in delta.values()) ** 0.5
        scale = min(1.0, goal / total) if total > 0 else 1.0
        for n, d in delta.items():
            mod = targets[n]
            if adapted(mod):  # the adapter carries s B A: scale B
                mod.lora_B[ADAPTER].weight.mul_(scale)
            else:
                w = mod.weight
                w.copy_((start[n].to(device).float() + scale * d).to(w.device, w.dtype))
        return {"scale": scale, "norm_before": total, "norm_target": goal, "norm_after": scale * total}

    def summary_line(self, r: dict) -> str:
        return (f"defense=shrink: scaled the update by {r['scale']:.4f} (||dW|| {r['norm_before']:.3f} -> "
                f"{r['norm_after']:.3f}, target {r['norm_target']:.3f})")
