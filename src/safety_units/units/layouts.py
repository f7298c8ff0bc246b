"""Which modules hold the units, per architecture: the module names of `units.names`, a per-architecture table
(DEFAULT_NAMES) and structural detection for a model type with no entry.

Names are relative to a decoder block, except `layers` (the blocks' ModuleList):
    mlp:    {in: [input projections, whose output rows are the units], out: the projection whose input columns are}
    attn:   {in: [], out: the attention output projection}
    head:   {q: [...], kv: [...], out: ...}, or {qkv: ..., layout: ..., out: ...} over a fused q/k/v
            (units.heads=true; safety_units.units.heads)
    expert: {experts: the fused-experts module (safety_units.units.experts), router: the module that routes to it}
A block with experts has expert units, and MLP units only where the mlp names are found too (Qwen2-MoE's shared
expert); a dense block of an MoE model (Qwen3-MoE's mlp_only_layers) has MLP units.

Detection: a decoder ModuleList whose first block has Llama's mlp.down_proj (with gate_proj / up_proj or a fused
gate_up_proj) and self_attn.o_proj, and / or a fused-experts module in its blocks, so a new model type with a
Llama-like layout, dense or MoE, needs no table entry.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from safety_units.units.experts import find_experts, find_router
from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)

LLAMA_HEAD = {"q": ["self_attn.q_proj"], "kv": ["self_attn.k_proj", "self_attn.v_proj"], "out": "self_attn.o_proj"}
LLAMA_NAMES = {"layers": "model.layers",
               "mlp": {"in": ["mlp.gate_proj", "mlp.up_proj"], "out": "mlp.down_proj"},
               "attn": {"in": [], "out": "self_attn.o_proj"},
               "head": LLAMA_HEAD}
# A fused q/k/v ("qkv") is read by its layout (safety_units.units.heads).
PHI3_HEAD = {"qkv": "self_attn.qkv_proj", "layout": "split", "out": "self_attn.o_proj"}
GPT2_NAMES = {"layers": "transformer.h",
              "mlp": {"in": ["mlp.c_fc"], "out": "mlp.c_proj"},
              "attn": {"in": [], "out": "attn.c_proj"},
              "head": {"qkv": "attn.c_attn", "layout": "split", "out": "attn.c_proj"}}
PHI3_NAMES = {"layers": "model.layers",
              "mlp": {"in": ["mlp.gate_up_proj"], "out": "mlp.down_proj"},  # fused: gate rows, then up rows
              "attn": {"in": [], "out": "self_attn.o_proj"},
              "head": PHI3_HEAD}
GPT_NEOX_NAMES = {"layers": "gpt_neox.layers",
                  "mlp": {"in": ["mlp.dense_h_to_4h"], "out": "mlp.dense_4h_to_h"},
                  "attn": {"in": [], "out": "attention.dense"},
                  "head": {"qkv": "attention.query_key_value", "layout": "per_head", "out": "attention.dense"}}
FALCON_NAMES = {"layers": "transformer.h",
                "mlp": {"in": ["mlp.dense_h_to_4h"], "out": "mlp.dense_4h_to_h"},
                "attn": {"in": [], "out": "self_attention.dense"},
                "head": {"qkv": "self_attention.query_key_value", "layout": "falcon", "out": "self_attention.dense"}}
OPT_NAMES = {"layers": "model.decoder.layers",
             "mlp": {"in": ["fc1"], "out": "fc2"},
             "attn": {"in": [], "out": "self_attn.out_proj"},
             "head": dict(LLAMA_HEAD, out="self_attn.out_proj")}
PHI_NAMES = {"layers": "model.layers",
             "mlp": {"in": ["mlp.fc1"], "out": "mlp.fc2"},
             "attn": {"in": [], "out": "self_attn.dense"},
             "head": dict(LLAMA_HEAD, out="self_attn.dense")}
# MoE: the fused experts and their router (transformers 5); Qwen2-MoE's always-on shared expert is an MLP.
EXPERTS = {"experts": "mlp.experts", "router": "mlp.gate"}
MOE_NAMES = dict(LLAMA_NAMES, expert=EXPERTS)
QWEN2_MOE_NAMES = dict(MOE_NAMES, mlp={"in": ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"],
                                       "out": "mlp.shared_expert.down_proj"})
GPT_OSS_NAMES = dict(LLAMA_NAMES, expert=dict(EXPERTS, router="mlp.router"))
# model_type -> module names; Llama-style names cover Mistral, Qwen2/3, Gemma, OLMo, SmolLM, Granite, StableLM.
DEFAULT_NAMES = {t: LLAMA_NAMES for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                          "gemma3_text", "olmo", "olmo2", "smollm3", "granite", "stablelm")}
DEFAULT_NAMES.update({t: MOE_NAMES for t in ("mixtral", "qwen3_moe", "olmoe")})
DEFAULT_NAMES.update(gpt2=GPT2_NAMES, phi3=PHI3_NAMES, gpt_neox=GPT_NEOX_NAMES, falcon=FALCON_NAMES, opt=OPT_NAMES,
                     phi=PHI_NAMES, qwen2_moe=QWEN2_MOE_NAMES, gpt_oss=GPT_OSS_NAMES)


def submodule(root: nn.Module, dotted: str) -> nn.Module | None:
    m = root
    for part in dotted.split("."):
        if not hasattr(m, part):
            return None
        m = getattr(m, part)
    return m


def use_names(model: nn.Module, names: dict | None) -> None:
    """Bind a run's `units.names` override to its model, so that what finds modules without the run's config --
    steering's block hooks, LoRA's `auto` targets, the prompt states -- finds the same ones."""
    if names and names.get("layers"):
        model.safety_units_names = {k: v for k, v in names.items() if k != "heads"}


def names_for(model: nn.Module, names: dict | None = None) -> dict:
    """The unit module names: `names` when it gives them (units.names), else those bound to the model (use_names),
    else the architecture's table entry, else Llama-style names found by structure; the `heads` flag (units.heads)
    is carried either way."""
    heads = bool(names and names.get("heads"))
    if names and names.get("layers"):
        return dict(names, heads=heads)
    if getattr(model, "safety_units_names", None):
        return dict(model.safety_units_names, heads=heads)
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
        f"(a decoder ModuleList whose blocks have mlp.down_proj, mlp.gate_proj / up_proj or gate_up_proj, or fused "
        f"experts, and self_attn.o_proj); set units.names in the config (layers / mlp.in / mlp.out / attn.in / "
        f"attn.out). "
        f"Modules in this model: {_module_sample(model)}"
    )


_ANNOUNCED: set = set()  # model types whose detected names were logged (once per process)


def detect_names(model: nn.Module) -> dict | None:
    """Llama-style unit names of a model with no table entry: the first ModuleList of num_hidden_layers blocks
    whose block 0 has mlp.down_proj fed by gate_proj / up_proj (or a fused gate_up_proj) or whose blocks hold fused
    experts, and self_attn.o_proj; heads when q_proj, k_proj and v_proj are separate. None when there is no such
    list."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len(module) == (n_layers or len(module)):
            names = _llama_layout(module, path)
            if names:
                return names
    return None


def _llama_layout(blocks: nn.ModuleList, layers: str) -> dict | None:
    block = blocks[0]

    def has(name: str) -> bool:
        return isinstance(getattr(submodule(block, name), "weight", None), torch.Tensor)

    experts = next(((b, name) for b in blocks if (name := find_experts(b))), None)
    mlp_in = [n for n in ("mlp.gate_proj", "mlp.up_proj") if has(n)] or [n for n in ("mlp.gate_up_proj",) if has(n)]
    if not ((mlp_in and has("mlp.down_proj")) or experts) or not has("self_attn.o_proj"):
        return None
    names = {"layers": layers, "mlp": {"in": mlp_in or LLAMA_NAMES["mlp"]["in"], "out": "mlp.down_proj"},
             "attn": {"in": [], "out": "self_attn.o_proj"}}
    if experts:
        b, name = experts
        names["expert"] = {"experts": name, "router": find_router(b, name, submodule(b, name).down_proj.shape[0])}
    if all(has(n) for n in LLAMA_HEAD["q"] + LLAMA_HEAD["kv"]):
        names["head"] = LLAMA_HEAD
    elif has(PHI3_HEAD["qkv"]):
        names["head"] = PHI3_HEAD
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


def mlp_writer(block: nn.Module, names: dict) -> nn.Module:
    """The module whose output is the block's MLP write to the residual stream: the MoE block around the experts
    (with its shared expert, if any) in a layer with experts, else the MLP's output projection."""
    experts = (names.get("expert") or {}).get("experts")
    if experts and submodule(block, experts) is not None:
        parent = experts.rpartition(".")[0]
        return submodule(block, parent) if parent else submodule(block, experts)
    return submodule(block, names["mlp"]["out"])


def decoder_layers(model: nn.Module, names: dict | None = None) -> nn.ModuleList:
    """The model's decoder blocks (`units.names.layers`)."""
    names = names_for(model, names)
    layers = submodule(model, names["layers"])
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"units.names.layers={names['layers']!r} is not a ModuleList in this model. "
                          f"Modules found: {_module_sample(model)}")
    return layers
