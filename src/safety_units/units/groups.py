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

A unit owns `width` consecutive entries of each slice along the slice's dimension (1 for channels, head_dim for a
head's q rows and o columns); a `shared` slice's block of `width` entries belongs to `shared` consecutive units.

A `UnitGroup` is all units of one kind in one layer: the parameter slices each unit owns, plus the module whose
*input* channels are the units (down_proj / o_proj), where activations are observed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from safety_units.utils.errors import ConfigError

KINDS = ("mlp", "attn", "head")

LLAMA_NAMES = {"layers": "model.layers",
               "mlp": {"in": ["mlp.gate_proj", "mlp.up_proj"], "out": "mlp.down_proj"},
               "attn": {"in": [], "out": "self_attn.o_proj"},
               "head": {"q": ["self_attn.q_proj"], "kv": ["self_attn.k_proj", "self_attn.v_proj"],
                        "out": "self_attn.o_proj"}}
GPT2_NAMES = {"layers": "transformer.h",
              "mlp": {"in": ["mlp.c_fc"], "out": "mlp.c_proj"},
              "attn": {"in": [], "out": "attn.c_proj"}}
# model_type -> module names; Llama-style names cover Mistral, Qwen2/3, Gemma, OLMo, SmolLM.
DEFAULT_NAMES = {t: LLAMA_NAMES for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                                          "gemma3_text", "olmo", "olmo2", "smollm3", "granite")}
DEFAULT_NAMES["gpt2"] = GPT2_NAMES


@dataclass
class ParamSlice:
    name: str  # name in model.named_parameters()
    param: nn.Parameter
    dim: int  # the dimension indexed by unit
    width: int = 1  # entries per unit (block) along dim
    shared: int = 1  # units sharing one block (grouped-query K/V)

    def entries(self, units: torch.Tensor, reduce: str = "all") -> torch.Tensor:
        """A per-unit bool vector as a per-entry vector along `dim`; a shared block is True when all (or any) of
        its units are."""
        if self.shared > 1:
            blocks = units.view(-1, self.shared)
            units = blocks.all(dim=1) if reduce == "all" else blocks.any(dim=1)
        return units.repeat_interleave(self.width) if self.width > 1 else units

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Per-entry values along `dim` summed per unit; a shared block's sum split evenly among its units."""
        if self.width > 1:
            values = values.view(-1, self.width).sum(dim=1)
        return values.repeat_interleave(self.shared) / self.shared if self.shared > 1 else values


@dataclass
class UnitGroup:
    kind: str
    layer: int
    n: int
    slices: list[ParamSlice] = field(default_factory=list)
    out_module: nn.Module | None = None  # its input channels are the units
    out_name: str = ""
    out_weight: ParamSlice | None = None  # the out module's weight slice (columns = units)
    width: int = 1  # input channels of out_module per unit (head_dim for a head)

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


def submodule(root: nn.Module, dotted: str) -> nn.Module | None:
    m = root
    for part in dotted.split("."):
        if not hasattr(m, part):
            return None
        m = getattr(m, part)
    return m


def _is_conv1d(module: nn.Module) -> bool:  # GPT-2 style: weight is (in_features, out_features)
    return type(module).__name__ == "Conv1D"


def names_for(model: nn.Module, names: dict | None = None) -> dict:
    """The unit module names: `names` when it gives them (units.names), else the architecture's defaults; the
    `heads` flag (units.heads) is carried either way."""
    heads = bool(names and names.get("heads"))
    if names and names.get("layers"):
        return dict(names, heads=heads)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_NAMES:
        return dict(DEFAULT_NAMES[model_type], heads=heads)
    raise ConfigError(
        f"no unit module names are known for model_type={model_type!r}; set units.names in the config "
        f"(layers / mlp.in / mlp.out / attn.in / attn.out). Modules in this model: {_module_sample(model)}"
    )


def _module_sample(model: nn.Module, limit: int = 40) -> str:
    """Module names with layer indices above 0 left out, so the list stays readable."""
    names = [n for n, _ in model.named_modules() if n and not re.search(r"\.[1-9][0-9]*(\.|$)", n)]
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def unit_names(cfg) -> dict | None:
    """The module-name overrides of a run config (`units.names`), resolved, with `heads: true` when units.heads is
    set; None means the architecture defaults, channels."""
    from omegaconf import OmegaConf

    units = cfg.get("units")
    names = OmegaConf.to_container(units.names, resolve=True) if units and units.get("names") else None
    if units and units.get("heads"):
        names = dict(names or {}, heads=True)
    return names


def with_heads(names: dict | None, heads: bool) -> dict | None:
    """`names` with the heads flag set as a unit map or selection needs it (its keys say which kinds it has)."""
    if bool(names and names.get("heads")) == heads:
        return names
    return dict(names or {}, heads=heads)


def has_heads(keys) -> bool:
    return any(str(k).startswith("head.") for k in keys)


def decoder_layers(model: nn.Module, names: dict | None = None) -> nn.ModuleList:
    """The model's decoder blocks (`units.names.layers`)."""
    names = names_for(model, names)
    layers = submodule(model, names["layers"])
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"units.names.layers={names['layers']!r} is not a ModuleList in this model. "
                          f"Modules found: {_module_sample(model)}")
    return layers


def resolve_units(model: nn.Module, names: dict | None = None) -> list[UnitGroup]:
    """All unit groups of the model, layer by layer, MLP then attention."""
    names = names_for(model, names)
    layers = decoder_layers(model, names)
    param_names = {id(p): n for n, p in model.named_parameters()}
    groups: list[UnitGroup] = []
    heads = _head_shape(model, names) if names.get("heads") else None
    for li, layer in enumerate(layers):
        for kind in ("mlp", "attn"):
            spec = names.get(kind)
            if heads and kind == "attn":
                groups.append(_head_group(layer, li, names["head"], names["layers"], param_names, *heads))
            elif spec:
                groups.append(_group(layer, li, kind, spec, names["layers"], param_names))
    return groups


def _head_shape(model: nn.Module, names: dict) -> tuple[int, int, int]:
    """(heads, kv heads, head_dim) from the model config, for units.heads."""
    if not names.get("head"):
        raise ConfigError("units.heads=true needs separate q/k/v projections (units.names.head: q, kv, out); "
                          "this architecture has none known (GPT-2's fused c_attn is not supported).")
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
        if m.weight.shape[dim] != n:
            raise ConfigError(f"units.names.{kind}.in: {name} has {m.weight.shape[dim]} output channels but "
                              f"{spec['out']} has {n} input channels; they cannot index the same units.")
        g.slices.append(ParamSlice(param_names[id(m.weight)], m.weight, dim))
        if getattr(m, "bias", None) is not None:
            g.slices.append(ParamSlice(param_names[id(m.bias)], m.bias, 0))
    return g


def unit_counts(groups: list[UnitGroup]) -> dict[str, list[int]]:
    """Units per layer of each kind; "head" only when heads are the units (so channel fingerprints are unchanged)."""
    return {kind: [g.n for g in groups if g.kind == kind] for kind in KINDS
            if kind != "head" or any(g.kind == "head" for g in groups)}
