"""Units: the neurons that attribution scores and masking freezes, defined once for every architecture.

* MLP unit (l, j): intermediate channel j of layer l -- row j of gate_proj and up_proj (and their bias entries),
  column j of down_proj.
* Attention unit (l, j): channel j of the attention output space before o_proj -- column j of o_proj. With
  grouped-query attention the v_proj rows are shared between heads, so they belong to no single unit.
* Head unit (l, h), with `units.heads=true` (kind "head", in place of "attn"): attention head h -- its head_dim
  columns of o_proj and rows of q_proj (and q bias). Its key/value head's rows of k_proj / v_proj are shared by the
  num_heads / num_kv_heads query heads of its group (grouped-query attention), so they count once, for the group:
  a shared K/V block is trainable only when every head of its group is (freezing one head freezes the K/V it
  reads), is zeroed only when every head of its group is ablated, and its score share is split evenly.
* Expert unit (l, e * I + j) of an MoE layer (kind "expert"): intermediate channel j of expert e -- entry [e, j] of
  the 3-D gate_up_proj's gate and up halves and [e, :, j] of down_proj (safety_units.units.experts). The router is
  no unit's (`units.router`); a set of every channel of an expert is the whole expert.

A unit owns `width` consecutive entries of each slice along the slice's dimension (1 for channels, head_dim for a
head's q rows and o columns); a `shared` slice's block of `width` entries belongs to `shared` consecutive units. A
fused projection holds `parts` copies of the unit axis end to end (Phi-3's gate_up_proj: gate rows, then up rows),
so MLP unit j owns row j of every part -- entries that are not contiguous. An expert slice (`experts` > 1) repeats
all of this per expert along its dimension 0.

Module names: safety_units.units.layouts. A `UnitGroup` is all units of one kind in one layer: the parameter slices
each unit owns, plus the module whose *input* channels are the units (down_proj / o_proj; the experts module),
where `tap` observes or replaces their activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from safety_units.units.experts import ExpertTap, layout
from safety_units.units.layouts import decoder_layers, names_for, submodule
from safety_units.utils.errors import ConfigError

KINDS = ("mlp", "expert", "attn", "head")


@dataclass
class ParamSlice:
    name: str  # name in model.named_parameters()
    param: nn.Parameter
    dim: int  # the dimension indexed by unit
    width: int = 1  # entries per unit (block) along dim
    shared: int = 1  # units sharing one block (grouped-query K/V)
    parts: int = 1  # copies of the unit axis laid end to end along dim (a fused gate_up_proj: 2)
    experts: int = 1  # > 1: dimension 0 is the expert axis; units e * U ... (e + 1) * U - 1 are expert e's

    def entries(self, units: torch.Tensor, reduce: str = "all") -> torch.Tensor:
        """A per-unit bool vector as a per-entry vector along `dim` ([experts, entries] for an expert slice); a
        shared block is True when all (or any) of its units are; a fused slice repeats it once per part."""
        units = units.view(self.experts, -1)
        if self.shared > 1:
            blocks = units.view(self.experts, -1, self.shared)
            units = blocks.all(dim=-1) if reduce == "all" else blocks.any(dim=-1)
        units = units.repeat_interleave(self.width, dim=-1) if self.width > 1 else units
        units = units.repeat(1, self.parts) if self.parts > 1 else units
        return units if self.experts > 1 else units[0]

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Per-entry values along `dim` (flat, or [experts, entries]) summed per unit (over every part of a fused
        slice); a shared block's sum split evenly among its units."""
        values = values.reshape(self.experts, -1)
        if self.parts > 1:
            values = values.view(self.experts, self.parts, -1).sum(dim=1)
        if self.width > 1:
            values = values.view(self.experts, -1, self.width).sum(dim=-1)
        if self.shared > 1:
            values = values.repeat_interleave(self.shared, dim=-1) / self.shared
        return values.flatten()

    @property
    def unit_dims(self) -> tuple[int, ...]:
        return (0, self.dim) if self.experts > 1 else (self.dim,)

    def channels_first(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """`t` (default: the parameter) as [entries along the unit dims, everything else]: an out weight's
        columns as rows, an expert slice's experts laid end to end."""
        t = self.param if t is None else t
        t = t.movedim(self.unit_dims, tuple(range(len(self.unit_dims))))
        return t.reshape(-1, *t.shape[len(self.unit_dims):]).flatten(1) if t.ndim > len(self.unit_dims) else \
            t.reshape(-1)

    def unit_values(self, t: torch.Tensor) -> torch.Tensor:
        """Per-unit sums of a tensor shaped like the parameter (a gradient product, a squared change)."""
        rows = self.channels_first(t)
        return self.per_unit(rows.sum(dim=1) if rows.ndim == 2 else rows)

    def broadcast(self, entries: torch.Tensor) -> torch.Tensor:
        """Per-entry values (as entries() returns them) shaped to broadcast against the parameter."""
        shape = [1] * self.param.ndim
        for d, size in zip(self.unit_dims, entries.shape):
            shape[d] = size
        return entries.reshape(shape)


@dataclass
class UnitGroup:
    kind: str
    layer: int
    n: int
    slices: list[ParamSlice] = field(default_factory=list)
    out_module: nn.Module | None = None  # its input channels are the units (experts: the experts module)
    out_name: str = ""
    out_weight: ParamSlice | None = None  # the out module's weight slice (columns = units)
    width: int = 1  # input channels of out_module per unit (head_dim for a head)
    experts: int = 1  # an expert group's experts: units e * (n / experts) ... are expert e's

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.layer}"

    def per_unit(self, channels: torch.Tensor) -> torch.Tensor:
        """Per-channel values at out_module's input ([..., n * width]) summed per unit ([..., n])."""
        if self.width == 1:
            return channels
        return channels.reshape(*channels.shape[:-1], self.n, self.width).sum(dim=-1)

    def per_channel(self, units: torch.Tensor) -> torch.Tensor:
        """Per-unit values ([n]) repeated over each unit's channels ([n * width])."""
        return units.repeat_interleave(self.width) if self.width > 1 else units


def tap(group: UnitGroup, fn):
    """Call fn(x, tokens, start) with the group's unit activations at each forward: x [tokens, channels] holds
    channels start ... start + channels - 1 of the group's n * width; tokens (LongTensor, or None for all) are the
    rows' positions in the flattened [batch * seq]. A returned tensor replaces x. Returns a handle (.remove()).

    Dense groups: a forward pre-hook on the out module (all tokens, all channels at once). Expert groups: one call
    per expert with the tokens routed to it (safety_units.units.experts.tapped_forward)."""
    if group.kind == "expert":
        return ExpertTap(group.out_module, fn, group.out_name)

    def hook(module, args):
        flat = args[0].reshape(-1, args[0].shape[-1])  # OPT feeds fc2 [batch * seq, channels]
        y = fn(flat, None, 0)
        # The flat view goes on even when unchanged: a tap that retains its gradient must be on the path.
        return ((flat if y is None else y).reshape(args[0].shape),) + tuple(args[1:])
    return group.out_module.register_forward_pre_hook(hook)


# nn.Linear subclasses that compute nn.Linear's product (x @ W.T + b), so exact masks and LoRA treat them as Linear;
# transformers' FalconLinear adds the bias after the matmul, the same result.
LINEAR_SUBCLASSES = ("FalconLinear",)


def _is_conv1d(module: nn.Module) -> bool:  # GPT-2 style: weight is (in_features, out_features)
    return type(module).__name__ == "Conv1D"


def resolve_units(model: nn.Module, names: dict | None = None) -> list[UnitGroup]:
    """All unit groups of the model, layer by layer: MLP (or experts, or both), then attention."""
    names = names_for(model, names)
    layers = decoder_layers(model, names)
    param_names = {id(p): n for n, p in model.named_parameters()}
    groups: list[UnitGroup] = []
    heads = _head_shape(model, names) if names.get("heads") else None
    for li, layer in enumerate(layers):
        experts = _expert_group(layer, li, names, param_names)
        mlp = names.get("mlp")
        if mlp and (experts is None or submodule(layer, mlp["out"]) is not None):  # a shared expert beside them
            groups.append(_group(layer, li, "mlp", mlp, names["layers"], param_names))
        if experts is not None:
            groups.append(experts)
        if heads:
            groups.append(_head_group(layer, li, names["head"], names["layers"], param_names, *heads))
        elif names.get("attn"):
            groups.append(_group(layer, li, "attn", names["attn"], names["layers"], param_names))
    return groups


def _expert_group(layer: nn.Module, li: int, names: dict, param_names: dict) -> UnitGroup | None:
    """The layer's expert units, None where it has no experts module (a dense layer, a dense model)."""
    path = (names.get("expert") or {}).get("experts")
    module = submodule(layer, path) if path else None
    if module is None:
        return None
    where = f"{names['layers']}.{li}.{path}"
    spec = layout(module, where)
    n_experts = spec["n_experts"]
    g = UnitGroup("expert", li, n_experts * spec["units"], out_module=module, out_name=where, experts=n_experts)
    for attr, dims in spec["params"].items():
        p = getattr(module, attr)
        g.slices.append(ParamSlice(param_names[id(p)], p, experts=n_experts, **dims))
    g.out_weight = g.slices[0]  # down_proj
    return g


def router_params(model: nn.Module, names: dict | None = None) -> list[str]:
    """Names of the routers' parameters (units.names.expert.router), one router per MoE layer."""
    names = names_for(model, names)
    spec = names.get("expert") or {}
    if not spec.get("router"):
        return []
    out = []
    for li, layer in enumerate(decoder_layers(model, names)):
        if spec.get("experts") and submodule(layer, spec["experts"]) is None:
            continue  # a dense layer
        router = submodule(layer, spec["router"])
        if router is None:
            raise ConfigError(f"units.names.expert.router: module '{spec['router']}' not found in "
                              f"{names['layers']}.{li}.")
        out += [f"{names['layers']}.{li}.{spec['router']}.{n}" for n, _ in router.named_parameters()]
    return out


def _head_shape(model: nn.Module, names: dict) -> tuple[int, int, int]:
    """(heads, kv heads, head_dim) from the model config, for units.heads."""
    if not names.get("head"):
        raise ConfigError("units.heads=true needs separate q/k/v projections (units.names.head: q, kv, out); "
                          "this architecture has none known (fused q/k/v -- GPT-2's c_attn, Phi-3's qkv_proj, "
                          "GPT-NeoX / Falcon's query_key_value -- is not supported).")
    cfg = getattr(model, "config", None)
    n_heads = getattr(cfg, "num_attention_heads", None)
    if not n_heads:
        raise ConfigError("units.heads=true: the model config has no num_attention_heads.")
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    if n_heads % n_kv:
        raise ConfigError(f"units.heads=true: {n_heads} heads do not split into {n_kv} key/value groups.")
    return n_heads, n_kv, head_dim


def _head_group(layer: nn.Module, li: int, spec: dict, layers_name: str, param_names: dict, n_heads: int,
                n_kv: int, head_dim: int) -> UnitGroup:
    def find(name: str, rows: int, conv_dim: int) -> nn.Module:
        m = submodule(layer, name)
        if m is None or not hasattr(m, "weight"):
            raise ConfigError(f"units.names.head: module '{name}' not found in {layers_name}.{li}.")
        if m.weight.shape[conv_dim] != rows:
            raise ConfigError(f"units.names.head: {name} has {m.weight.shape[conv_dim]} channels, expected {rows} "
                              f"({rows // head_dim} heads x head_dim {head_dim}).")
        return m

    out = find(spec["out"], n_heads * head_dim, 1)
    g = UnitGroup("head", li, n_heads, out_module=out, out_name=f"{layers_name}.{li}.{spec['out']}", width=head_dim)
    g.out_weight = ParamSlice(param_names[id(out.weight)], out.weight, 1, head_dim)
    g.slices.append(g.out_weight)
    for names_, rows, shared in ((spec.get("q") or [], n_heads, 1), (spec.get("kv") or [], n_kv, n_heads // n_kv)):
        for name in names_:
            m = find(name, rows * head_dim, 0)
            g.slices.append(ParamSlice(param_names[id(m.weight)], m.weight, 0, head_dim, shared))
            if getattr(m, "bias", None) is not None:
                g.slices.append(ParamSlice(param_names[id(m.bias)], m.bias, 0, head_dim, shared))
    return g


def _group(layer: nn.Module, li: int, kind: str, spec: dict, layers_name: str, param_names: dict) -> UnitGroup:
    def find(name: str) -> nn.Module:
        m = submodule(layer, name)
        if m is None or not hasattr(m, "weight"):
            found = ", ".join(n for n, mod in layer.named_modules() if n and hasattr(mod, "weight"))
            raise ConfigError(f"units.names.{kind}: module '{name}' not found in {layers_name}.{li}. "
                              f"Modules with weights there: {found}")
        return m

    out = find(spec["out"])
    out_dim = 0 if _is_conv1d(out) else 1
    n = out.weight.shape[out_dim]
    g = UnitGroup(kind, li, n, out_module=out, out_name=f"{layers_name}.{li}.{spec['out']}")
    g.out_weight = ParamSlice(param_names[id(out.weight)], out.weight, out_dim)
    g.slices.append(g.out_weight)
    for name in spec.get("in") or []:
        m = find(name)
        dim = 1 if _is_conv1d(m) else 0
        channels = m.weight.shape[dim]
        if channels % n:
            raise ConfigError(f"units.names.{kind}.in: {name} has {channels} output channels but {spec['out']} has "
                              f"{n} input channels; they cannot index the same units (a fused projection has a "
                              f"whole multiple of them).")
        parts = channels // n  # > 1: a fused projection, e.g. gate_up_proj = [gate; up]
        g.slices.append(ParamSlice(param_names[id(m.weight)], m.weight, dim, parts=parts))
        if getattr(m, "bias", None) is not None:
            g.slices.append(ParamSlice(param_names[id(m.bias)], m.bias, 0, parts=parts))
    return g


def unit_counts(groups: list[UnitGroup]) -> dict[str, list[int]]:
    """Units per layer of each kind; "head" and "expert" only where they are units (so dense channel fingerprints
    are unchanged)."""
    return {kind: [g.n for g in groups if g.kind == kind] for kind in KINDS
            if kind in ("mlp", "attn") or any(g.kind == kind for g in groups)}
