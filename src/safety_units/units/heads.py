"""Attention heads as units (`units.heads=true`, kind "head"), over separate or fused q/k/v projections.

Head h owns its head_dim input columns of the output projection and its q rows (and q bias); its key/value head's
k / v rows are shared by the num_heads / num_kv_heads query heads of its group (`shared`). Fused q/k/v projections
(`units.names.head.qkv`) are read by their `layout`:

* `split`: all q rows, then all k rows, then all v rows (Phi-3's qkv_proj; GPT-2's Conv1D c_attn, columns);
* `per_head`: per head its q, k and v rows (GPT-NeoX's query_key_value, Falcon without multi-query);
* `grouped`: per key/value group its heads' q rows, then the group's k and v rows (Falcon's new decoder);
* `falcon`: whichever of the three a Falcon config says (new_decoder_architecture, multi_query).

Where a norm spans every head's q (or k) at once (OLMo-2, OLMoE: q_norm over num_heads * head_dim), zeroing one
head's q rows would move the other heads: ablation then leaves q/k rows alone (`ablate=False`) and removes the head's
write through its output columns, which is what its gate does; freezing still freezes them.
"""

from __future__ import annotations

import torch
from torch import nn

from safety_units.units.layouts import submodule
from safety_units.units.slices import ParamSlice, UnitGroup, is_conv1d
from safety_units.utils.errors import ConfigError

LAYOUTS = ("split", "per_head", "grouped", "falcon")


def head_shape(model: nn.Module, names: dict) -> tuple[int, int, int, str | None]:
    """(heads, kv heads, head_dim, fused q/k/v layout or None) from the model config, for units.heads."""
    spec = names.get("head")
    if not spec:
        raise ConfigError("units.heads=true needs the attention's q/k/v projections (units.names.head: q, kv, out; "
                          "or qkv, layout, out for a fused one); this architecture has none known.")
    cfg = getattr(model, "config", None)
    n_heads = getattr(cfg, "num_attention_heads", None)
    if not n_heads:
        raise ConfigError("units.heads=true: the model config has no num_attention_heads.")
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layout = spec.get("layout") if spec.get("qkv") else None
    if layout == "falcon":
        if getattr(cfg, "new_decoder_architecture", False):
            layout, n_kv = "grouped", cfg.num_kv_heads
        elif getattr(cfg, "multi_query", False):
            layout, n_kv = "split", 1
        else:
            layout, n_kv = "per_head", n_heads
    if spec.get("qkv") and layout not in LAYOUTS[:3]:
        raise ConfigError(f"units.names.head.layout must be one of {LAYOUTS} for a fused qkv, got {layout!r}.")
    if n_heads % n_kv or (layout == "per_head" and n_kv != n_heads):
        raise ConfigError(f"units.heads=true: {n_heads} heads do not split into {n_kv} key/value groups"
                          f"{' (layout per_head has one per head)' if layout == 'per_head' else ''}.")
    return n_heads, n_kv, head_dim, layout


def qkv_index(layout: str, n_heads: int, n_kv: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Positions of the q rows (head order), k rows and v rows (key/value-head order) in a fused projection."""
    hd, group = torch.arange(head_dim), n_heads // n_kv
    if layout == "split":
        q = torch.arange(n_heads * head_dim)
        k = n_heads * head_dim + torch.arange(n_kv * head_dim)
        return q, k, k + n_kv * head_dim
    if layout == "per_head":
        starts = torch.arange(n_heads) * 3 * head_dim
        q = (starts[:, None] + hd).flatten()
        return q, q + head_dim, q + 2 * head_dim
    block = (group + 2) * head_dim  # grouped: [q_0 .. q_{group-1}, k, v] per key/value head
    q = (torch.arange(n_kv)[:, None, None] * block + torch.arange(group)[None, :, None] * head_dim + hd).flatten()
    k = (torch.arange(n_kv)[:, None] * block + group * head_dim + hd).flatten()
    return q, k, k + head_dim


def head_group(layer: nn.Module, li: int, spec: dict, layers_name: str, param_names: dict, n_heads: int,
               n_kv: int, head_dim: int, layout: str | None) -> UnitGroup:
    def find(name: str, rows: int, out_side: bool) -> tuple[nn.Module, int]:
        m = submodule(layer, name)
        if m is None or not hasattr(m, "weight"):
            raise ConfigError(f"units.names.head: module '{name}' not found in {layers_name}.{li}.")
        dim = (1 if out_side else 0) if not is_conv1d(m) else (0 if out_side else 1)
        if m.weight.shape[dim] != rows:
            raise ConfigError(f"units.names.head: {name} has {m.weight.shape[dim]} channels, expected {rows} "
                              f"({n_heads} heads, {n_kv} key/value heads, head_dim {head_dim}).")
        return m, dim

    out, out_dim = find(spec["out"], n_heads * head_dim, True)
    g = UnitGroup("head", li, n_heads, out_module=out, out_name=f"{layers_name}.{li}.{spec['out']}", width=head_dim)
    g.out_weight = ParamSlice(param_names[id(out.weight)], out.weight, out_dim, head_dim)
    g.slices.append(g.out_weight)
    spans = _norm_spans_heads(layer, spec, n_heads * head_dim)

    def add(m: nn.Module, dim: int, shared: int, index: torch.Tensor | None, ablate: bool) -> None:
        g.slices.append(ParamSlice(param_names[id(m.weight)], m.weight, dim, head_dim, shared, index=index,
                                   ablate=ablate))
        if getattr(m, "bias", None) is not None:
            g.slices.append(ParamSlice(param_names[id(m.bias)], m.bias, 0, head_dim, shared, index=index,
                                       ablate=ablate))

    if spec.get("qkv"):
        m, dim = find(spec["qkv"], (n_heads + 2 * n_kv) * head_dim, False)
        for index, shared, ablate in zip(qkv_index(layout, n_heads, n_kv, head_dim), (1, n_heads // n_kv,
                                                                                       n_heads // n_kv),
                                         (not spans, not spans, True)):
            add(m, dim, shared, index, ablate)
        return g
    for names_, rows, shared in ((spec.get("q") or [], n_heads, 1), (spec.get("kv") or [], n_kv, n_heads // n_kv)):
        for name in names_:
            m, dim = find(name, rows * head_dim, False)
            add(m, dim, shared, None, not (spans and not name.endswith("v_proj")))
    return g


def _norm_spans_heads(layer: nn.Module, spec: dict, q_channels: int) -> bool:
    """Does a q_norm next to the q projection normalise every head's q at once (OLMo-2, OLMoE)?"""
    q = (spec.get("q") or [spec.get("qkv") or ""])[0]
    attn = submodule(layer, q.rpartition(".")[0]) if "." in q else layer
    norm = getattr(attn, "q_norm", None)
    weight = getattr(norm, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.numel() == q_channels
