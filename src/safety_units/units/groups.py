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
head's q rows and o columns); a `shared` slice's block of `width` entries belongs to `shared` consecutive units. A
fused projection holds `parts` copies of the unit axis end to end (Phi-3's gate_up_proj: gate rows, then up rows),
so MLP unit j owns row j of every part -- entries that are not contiguous.

Module names come from `units.names`, else the per-architecture table DEFAULT_NAMES, else structural detection: a
decoder ModuleList whose first block has Llama's mlp.down_proj (with gate_proj / up_proj or a fused gate_up_proj)
and self_attn.o_proj, so a new model type with a Llama layout needs no table entry.

A `UnitGroup` is all units of one kind in one layer: the parameter slices each unit owns, plus the module whose
*input* channels are the units (down_proj / o_proj), where activations are observed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)

KINDS = ("mlp", "attn", "head")

LLAMA_HEAD = {"q": ["self_attn.q_proj"], "kv": ["self_attn.k_proj", "self_attn.v_proj"], "out": "self_attn.o_proj"}
LLAMA_NAMES = {"layers": "model.layers",
               "mlp": {"in": ["mlp.gate_proj", "mlp.up_proj"], "out": "mlp.down_proj"},
               "attn": {"in": [], "out": "self_attn.o_proj"},
               "head": LLAMA_HEAD}
GPT2_NAMES = {"layers": "transformer.h",
              "mlp": {"in": ["mlp.c_fc"], "out": "mlp.c_proj"},
              "attn": {"in": [], "out": "attn.c_proj"}}
# No "head" entry where q/k/v are one fused module (Phi-3 qkv_proj, GPT-NeoX / Falcon query_key_value, GPT-2 c_attn).
PHI3_NAMES = {"layers": "model.layers",
              "mlp": {"in": ["mlp.gate_up_proj"], "out": "mlp.down_proj"},  # fused: gate rows, then up rows
              "attn": {"in": [], "out": "self_attn.o_proj"}}
GPT_NEOX_NAMES = {"layers": "gpt_neox.layers",
                  "mlp": {"in": ["mlp.dense_h_to_4h"], "out": "mlp.dense_4h_to_h"},
                  "attn": {"in": [], "out": "attention.dense"}}
FALCON_NAMES = {"layers": "transformer.h",
                "mlp": {"in": ["mlp.dense_h_to_4h"], "out": "mlp.dense_4h_to_h"},
                "attn": {"in": [], "out": "self_attention.dense"}}
OPT_NAMES = {"layers": "model.decoder.layers",
             "mlp": {"in": ["fc1"], "out": "fc2"},
             "attn": {"in": [], "out": "self_attn.out_proj"},
             "head": dict(LLAMA_HEAD, out="self_attn.out_proj")}
PHI_NAMES = {"layers": "model.layers",
             "mlp": {"in": ["mlp.fc1"], "out": "mlp.fc2"},
             "attn": {"in": [], "out": "self_attn.dense"},
             "head": dict(LLAMA_HEAD, out="self_attn.dense")}
# model_type -> module names; Llama-style names cover Mistral, Qwen2/3, Gemma, OLMo, SmolLM, Granite, StableLM.
DEFAULT_NAMES = {t: LLAMA_NAMES for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                                          "gemma3_text", "olmo", "olmo2", "smollm3", "granite", "stablelm")}
DEFAULT_NAMES.update(gpt2=GPT2_NAMES, phi3=PHI3_NAMES, gpt_neox=GPT_NEOX_NAMES, falcon=FALCON_NAMES, opt=OPT_NAMES,
                     phi=PHI_NAMES)


@dataclass
class ParamSlice:
    name: str  # name in model.named_parameters()
    param: nn.Parameter
    dim: int  # the dimension indexed by unit
    width: int = 1  # entries per unit (block) along dim
    shared: int = 1  # units sharing one block (grouped-query K/V)
    parts: int = 1  # copies of the unit axis laid end to end along dim (a fused gate_up_proj: 2)

    def entries(self, units: torch.Tensor, reduce: str = "all") -> torch.Tensor:
        """A per-unit bool vector as a per-entry vector along `dim`; a shared block is True when all (or any) of
        its units are; a fused slice repeats it once per part."""
        if self.shared > 1:
            blocks = units.view(-1, self.shared)
            units = blocks.all(dim=1) if reduce == "all" else blocks.any(dim=1)
        units = units.repeat_interleave(self.width) if self.width > 1 else units
        return units.repeat(self.parts) if self.parts > 1 else units

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Per-entry values along `dim` summed per unit (over every part of a fused slice); a shared block's sum
        split evenly among its units."""
        if self.parts > 1:
            values = values.view(self.parts, -1).sum(dim=0)
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


# nn.Linear subclasses that compute nn.Linear's product (x @ W.T + b), so exact masks and LoRA treat them as Linear;
# transformers' FalconLinear adds the bias after the matmul, the same result.
LINEAR_SUBCLASSES = ("FalconLinear",)


def _is_conv1d(module: nn.Module) -> bool:  # GPT-2 style: weight is (in_features, out_features)
    return type(module).__name__ == "Conv1D"


def names_for(model: nn.Module, names: dict | None = None) -> dict:
    """The unit module names: `names` when it gives them (units.names), else the architecture's table entry, else
    Llama-style names found by structure; the `heads` flag (units.heads) is carried either way."""
    heads = bool(names and names.get("heads"))
    if names and names.get("layers"):
        return dict(names, heads=heads)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_NAMES:
        return dict(DEFAULT_NAMES[model_type], heads=heads)
    detected = detect_names(model)
    if detected:
        if model_type not in _ANNOUNCED:
            _ANNOUNCED.add(model_type)
            log.info("units: model_type=%r has no table entry; using the Llama-style names found in the model: "
                     "%s", model_type, detected)
        return dict(detected, heads=heads)
    raise ConfigError(
        f"no unit module names are known for model_type={model_type!r}, and no Llama-style layout was found "
        f"(a decoder ModuleList whose blocks have mlp.down_proj, mlp.gate_proj / up_proj or gate_up_proj, and "
        f"self_attn.o_proj); set units.names in the config (layers / mlp.in / mlp.out / attn.in / attn.out). "
        f"Modules in this model: {_module_sample(model)}"
    )


_ANNOUNCED: set = set()  # model types whose detected names were logged (once per process)


def detect_names(model: nn.Module) -> dict | None:
    """Llama-style unit names of a model with no table entry: the first ModuleList of num_hidden_layers blocks
    whose block 0 has mlp.down_proj fed by gate_proj / up_proj (or a fused gate_up_proj) and self_attn.o_proj;
    heads when q_proj, k_proj and v_proj are separate. None when there is no such list."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len(module) == (n_layers or len(module)):
            names = _llama_layout(module[0], path)
            if names:
                return names
    return None


def _llama_layout(block: nn.Module, layers: str) -> dict | None:
    def has(name: str) -> bool:
        return isinstance(getattr(submodule(block, name), "weight", None), torch.Tensor)

    mlp_in = [n for n in ("mlp.gate_proj", "mlp.up_proj") if has(n)] or [n for n in ("mlp.gate_up_proj",) if has(n)]
    if not (mlp_in and has("mlp.down_proj") and has("self_attn.o_proj")):
        return None
    names = {"layers": layers, "mlp": {"in": mlp_in, "out": "mlp.down_proj"},
             "attn": {"in": [], "out": "self_attn.o_proj"}}
    if all(has(n) for n in LLAMA_HEAD["q"] + LLAMA_HEAD["kv"]):
        names["head"] = LLAMA_HEAD
    return names


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
    """Units per layer of each kind; "head" only when heads are the units (so channel fingerprints are unchanged)."""
    return {kind: [g.n for g in groups if g.kind == kind] for kind in KINDS
            if kind != "head" or any(g.kind == "head" for g in groups)}
