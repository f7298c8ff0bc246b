"""MoE experts as units: the fused 3-D expert tensors of transformers 5 and a forward that can observe them.

transformers 5 stores a layer's experts as 3-D parameters of one module (`mlp.experts` in Mixtral, Qwen2/3-MoE,
OLMoE, gpt-oss and the other models its `use_experts_implementation` decorator covers): `gate_up_proj` [E, 2I, H]
(or `up_proj` without a gate), `down_proj` [E, H, I], transposed ([E, H, 2I] / [E, I, H]) where the module says
`is_transposed`, gate and up halves end to end (`is_concatenated`) or interleaved (gate_0, up_0, gate_1, ...),
optional biases. An expert unit is (layer, expert e, intermediate channel j), flattened to e * I + j.

The module computes its experts inside one forward (grouped GEMMs), so no hook sees an expert's channels.
`tapped_forward` is the eager per-expert loop of transformers' own implementation with one addition: between the
gate and down_proj each tap sees (and may replace) the channels of the tokens routed to that expert. It is installed
only while a tap is (attribution); training and generation keep the model's own implementation.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from safety_units.utils.errors import ConfigError


def is_experts(module: nn.Module) -> bool:
    """A fused-experts module: a 3-D down_proj with an up (or gate_up) projection of as many experts."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return (isinstance(down, nn.Parameter) and down.ndim == 3 and isinstance(up, nn.Parameter) and up.ndim == 3
            and down.shape[0] == up.shape[0])


def find_experts(block: nn.Module) -> str | None:
    """The dotted name of the fused-experts module inside a decoder block, None when the block has none."""
    return next((name for name, m in block.named_modules() if name and is_experts(m)), None)


def find_router(block: nn.Module, experts_name: str, n_experts: int) -> str | None:
    """The router beside the experts: the sibling module whose weight is [n_experts, hidden] (Mixtral's `gate`,
    gpt-oss' `router`)."""
    parent = experts_name.rpartition(".")[0]
    for name, m in block.named_modules():
        w = getattr(m, "weight", None)
        if (name.rpartition(".")[0] == parent and name != experts_name and isinstance(w, torch.Tensor)
                and w.ndim == 2 and w.shape[0] == n_experts):
            return name
    return None


def layout(module: nn.Module, where: str) -> dict:
    """How the module lays out its units: for each unit-bearing parameter, the dimension of the unit axis (after
    the expert axis 0), parts (2: gate and up halves end to end) and width (2: interleaved gate/up pairs)."""
    if getattr(module, "has_post_expert_norm", False):
        raise ConfigError(f"{where}: experts with a norm after each expert are not supported as units (the norm "
                          f"mixes an expert's channels).")
    transposed = bool(getattr(module, "is_transposed", False))
    gated = hasattr(module, "gate_up_proj")
    interleaved = gated and not getattr(module, "is_concatenated", True)
    up = module.gate_up_proj if gated else module.up_proj
    down = module.down_proj
    n_experts, units = down.shape[0], down.shape[1 if transposed else 2]
    up_dim = 2 if transposed else 1
    if up.shape[up_dim] != units * (2 if gated else 1):
        raise ConfigError(f"{where}: {'gate_up_proj' if gated else 'up_proj'} has {up.shape[up_dim]} output "
                          f"channels per expert; down_proj reads {units}.")
    spec = dict(parts=2 if gated and not interleaved else 1, width=2 if interleaved else 1)
    params = {"down_proj": dict(dim=1 if transposed else 2),
              ("gate_up_proj" if gated else "up_proj"): dict(dim=up_dim, **spec)}
    bias = ("gate_up_proj_bias" if gated else "up_proj_bias")
    has_bias = isinstance(getattr(module, bias, None), nn.Parameter)
    if has_bias:  # down_proj_bias is per output channel: no unit's own
        params[bias] = dict(dim=1, **spec)
    return {"n_experts": n_experts, "units": units, "params": params, "transposed": transposed, "gated": gated,
            "interleaved": interleaved, "up_bias": bias if has_bias else None,
            "down_bias": isinstance(getattr(module, "down_proj_bias", None), nn.Parameter)}


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ w if transposed else nn.functional.linear(x, w)
    return y + b if b is not None else y


def _gate(module: nn.Module, h: torch.Tensor, spec: dict) -> torch.Tensor:
    """act(gate) * up, as the module computes it (its own _apply_gate: gpt-oss clamps and scales)."""
    if not spec["gated"]:
        return module.act_fn(h)
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(h)
    gate, up = (h[..., ::2], h[..., 1::2]) if spec["interleaved"] else h.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def tapped_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop; each tap in self._unit_taps gets (channels [tokens, I], token indices,
    first unit e * I) between the gate and down_proj and may return a replacement."""
    spec = self._unit_layout
    units, out = spec["units"], torch.zeros_like(hidden_states)
    up = self.gate_up_proj if spec["gated"] else self.up_proj
    up_bias = getattr(self, spec["up_bias"]) if spec["up_bias"] else None
    down_bias = self.down_proj_bias if spec["down_bias"] else None
    for e in range(spec["n_experts"]):
        token, slot = torch.where(top_k_index == e)  # top-k experts are distinct: each token at most once
        if token.numel() == 0:
            continue
        h = _linear(hidden_states[token], up[e], None if up_bias is None else up_bias[e], spec["transposed"])
        h = _gate(self, h, spec)
        for fn in self._unit_taps:
            replaced = fn(h, token, e * units)
            h = h if replaced is None else replaced
        y = _linear(h, self.down_proj[e], None if down_bias is None else down_bias[e], spec["transposed"])
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


class ExpertTap:
    """A tap on a fused-experts module: installs tapped_forward with the first tap, restores the module's own
    forward when the last is removed."""

    def __init__(self, module: nn.Module, fn, where: str):
        if not hasattr(module, "_unit_taps"):
            module._unit_layout = layout(module, where)
            module._unit_taps = []
            module.forward = types.MethodType(tapped_forward, module)
        module._unit_taps.append(fn)
        self.module, self.fn = module, fn

    def remove(self) -> None:
        taps = getattr(self.module, "_unit_taps", None)
        if taps is None or self.fn not in taps:
            return
        taps.remove(self.fn)
        if not taps:
            del self.module.forward, self.module._unit_taps, self.module._unit_layout
