"""Units: the neurons that attribution scores and masking freezes, defined once for every architecture.

* MLP unit (l, j): intermediate channel j of layer l -- row j of gate_proj and up_proj (and their bias entries),
  column j of down_proj.
* Attention unit (l, j): channel j of the attention output space before o_proj -- column j of o_proj. With
  grouped-query attention the v_proj rows are shared between heads, so they belong to no single unit.
* Head unit (l, h), with `units.heads=true` (kind "head", in place of "attn"; safety_units.units.heads): attention
  head h -- its head_dim columns of o_proj and rows of q_proj (and q bias), in a fused q/k/v wherever they sit. Its key/value head's rows of k_proj / v_proj are shared by the
  num_heads / num_kv_heads query heads of its group (grouped-query attention), so they count once, for the group:
  a shared K/V block is trainable only when every head of its group is (freezing one head freezes the K/V it
  reads), is zeroed only when every head of its group is ablated, and its score share is split evenly.
* Expert unit (l, e * I + j) of an MoE layer (kind "expert"): intermediate channel j of expert e -- entry [e, j] of
  the 3-D gate_up_proj's gate and up halves and [e, :, j] of down_proj (safety_units.units.experts). The router is
  no unit's (`units.router`); a set of every channel of an expert is the whole expert.

How a slice's entries map to units: safety_units.units.slices. Module names: safety_units.units.layouts. A `UnitGroup` is all units of one kind in one layer: the parameter slices
each unit owns, plus the module whose *input* channels are the units (down_proj / o_proj; the experts module),
where `tap` observes or replaces their activations.
"""

from __future__ import annotations

from torch import nn

from safety_units.units.experts import ExpertTap, layout
from safety_units.units.heads import head_group, head_shape
from safety_units.units.layouts import decoder_layers, names_for, submodule
from safety_units.units.slices import ParamSlice, UnitGroup, is_conv1d
from safety_units.utils.errors import ConfigError

__all__ = ["KINDS", "LINEAR_SUBCLASSES", "ParamSlice", "UnitGroup", "resolve_units", "router_params", "tap",
           "unit_counts"]

KINDS = ("mlp", "expert", "attn", "head")


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


def resolve_units(model: nn.Module, names: dict | None = None) -> list[UnitGroup]:
    """All unit groups of the model, layer by layer: MLP (or experts, or both), then attention."""
    names = names_for(model, names)
    layers = decoder_layers(model, names)
    param_names = {id(p): n for n, p in model.named_parameters()}
    groups: list[UnitGroup] = []
    heads = head_shape(model, names) if names.get("heads") else None
    for li, layer in enumerate(layers):
        experts = _expert_group(layer, li, names, param_names)
        mlp = names.get("mlp")
        if mlp and (experts is None or submodule(layer, mlp["out"]) is not None):  # a shared expert beside them
            groups.append(_group(layer, li, "mlp", mlp, names["layers"], param_names))
        if experts is not None:
            groups.append(experts)
        if heads:
            groups.append(head_group(layer, li, names["head"], names["layers"], param_names, *heads))
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


def _group(layer: nn.Module, li: int, kind: str, spec: dict, layers_name: str, param_names: dict) -> UnitGroup:
    def find(name: str) -> nn.Module:
        m = submodule(layer, name)
        if m is None or not hasattr(m, "weight"):
            found = ", ".join(n for n, mod in layer.named_modules() if n and hasattr(mod, "weight"))
            raise ConfigError(f"units.names.{kind}: module '{name}' not found in {layers_name}.{li}. "
                              f"Modules with weights there: {found}")
        return m

    out = find(spec["out"])
    out_dim = 0 if is_conv1d(out) else 1
    n = out.weight.shape[out_dim]
    g = UnitGroup(kind, li, n, out_module=out, out_name=f"{layers_name}.{li}.{spec['out']}")
    g.out_weight = ParamSlice(param_names[id(out.weight)], out.weight, out_dim)
    g.slices.append(g.out_weight)
    for name in spec.get("in") or []:
        m = find(name)
        dim = 1 if is_conv1d(m) else 0
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
