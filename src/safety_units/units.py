"""Units: the neurons that attribution scores and masking freezes, defined once for every architecture.

* MLP unit (l, j): intermediate channel j of layer l -- row j of gate_proj and up_proj (and their bias entries),
  column j of down_proj.
* Attention unit (l, j): channel j of the attention output space before o_proj -- column j of o_proj. With
  grouped-query attention the v_proj rows are shared between heads, so they belong to no single unit.

A `UnitGroup` is all units of one kind in one layer: the parameter slices each unit owns, plus the module whose
*input* channels are the units (down_proj / o_proj), where activations are observed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from safety_units.errors import ConfigError

KINDS = ("mlp", "attn")

LLAMA_NAMES = {"layers": "model.layers",
               "mlp": {"in": ["mlp.gate_proj", "mlp.up_proj"], "out": "mlp.down_proj"},
               "attn": {"in": [], "out": "self_attn.o_proj"}}
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


@dataclass
class UnitGroup:
    kind: str
    layer: int
    n: int
    slices: list[ParamSlice] = field(default_factory=list)
    out_module: nn.Module | None = None  # its input channels are the units
    out_name: str = ""
    out_weight: ParamSlice | None = None  # the out module's weight slice (columns = units)

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.layer}"


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    m = root
    for part in dotted.split("."):
        if not hasattr(m, part):
            return None
        m = getattr(m, part)
    return m


def _is_conv1d(module: nn.Module) -> bool:  # GPT-2 style: weight is (in_features, out_features)
    return type(module).__name__ == "Conv1D"


def names_for(model: nn.Module, names: dict | None = None) -> dict:
    if names:
        return names
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_NAMES:
        return DEFAULT_NAMES[model_type]
    raise ConfigError(
        f"no unit module names are known for model_type={model_type!r}; set units.names in the config "
        f"(layers / mlp.in / mlp.out / attn.in / attn.out). Modules in this model: {_module_sample(model)}"
    )


def _module_sample(model: nn.Module, limit: int = 40) -> str:
    """Module names with layer indices above 0 left out, so the list stays readable."""
    names = [n for n, _ in model.named_modules() if n and not re.search(r"\.[1-9][0-9]*(\.|$)", n)]
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def unit_names(cfg) -> dict | None:
    """The module-name overrides of a run config (`units.names`), resolved; None means the architecture defaults."""
    from omegaconf import OmegaConf

    units = cfg.get("units")
    return OmegaConf.to_container(units.names, resolve=True) if units and units.get("names") else None


def decoder_layers(model: nn.Module, names: dict | None = None) -> nn.ModuleList:
    """The model's decoder blocks (`units.names.layers`)."""
    names = names_for(model, names)
    layers = _get(model, names["layers"])
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
    for li, layer in enumerate(layers):
        for kind in KINDS:
            spec = names.get(kind)
            if not spec:
                continue
            groups.append(_group(layer, li, kind, spec, names["layers"], param_names))
    return groups


def _group(layer: nn.Module, li: int, kind: str, spec: dict, layers_name: str, param_names: dict) -> UnitGroup:
    def find(name: str) -> nn.Module:
        m = _get(layer, name)
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
    return {kind: [g.n for g in groups if g.kind == kind] for kind in KINDS}
