"""LoRA adapters (`adapter=lora`, via peft) that compose exactly with unit freezing.

A LoRA module adds dW = scaling * B @ A to its weight W (out, in), with B (out, r) starting at zero and A (r, in)
random. A frozen unit slice of W gets dW = 0 exactly:

* a frozen row j (gate_proj / up_proj of MLP unit j): row j of B is held at zero, so dW[j] = B[j] @ A = 0;
* a frozen column j (down_proj of MLP unit j, o_proj of attention unit j): column j of A is held at zero, so
  dW[:, j] = B @ A[:, j] = 0.

Targets (`adapter.target_modules`): `auto` = every Linear / Conv1D projection inside the decoder blocks (Llama's
q/k/v/o/gate/up/down_proj; GPT-2's c_attn / c_fc / c_proj; Phi-3's fused qkv_proj / gate_up_proj ...), `peft` =
peft's per-model-type defaults, or a list of names. GPT-2's Conv1D stores W transposed (in, out): peft adapts it with
fan_in_fan_out, and a frozen unit slice's mask goes to B when it indexes the weight's output channels (Linear dim 0,
Conv1D dim 1), to A when it indexes the input channels. A fused slice (gate_up_proj) carries its per-entry mask.

The factor's unit dimension is the weight's (B: rows, A: columns), so the unit masks carry over unchanged. "Held at
zero" = the entries start at zero (B is zero-initialised; A's frozen columns are zeroed here) and a Masker on the
LoRA factors keeps them there exactly as it keeps frozen weights (safety_units.units.masking): gradient masked before
clipping and all-reduce, so Adam's moments stay zero; decoupled weight decay masked. A module whose weight is wholly
frozen -- q/k/v (and every module without units) under ru_only / train_only, whole layers under freeze=layers --
gets no adapter at all. As in any LoRA run, everything outside the adapters (embeddings, norms, lm_head, the base
weights) stays as loaded.

The LightningModule trains the Hugging Face model with the LoRA layers injected (peft's `get_base_model()`), so
callbacks that evaluate or score the model see an ordinary causal LM whose forward includes the adapters.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from safety_units.utils.errors import ConfigError
from safety_units.units.groups import LINEAR_SUBCLASSES
from safety_units.units.layouts import decoder_layers
from safety_units.units.masking import Masker, PartialMask
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)

ADAPTER = "default"  # peft's name of the (only) adapter
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AUTO, PEFT = "auto", "peft"  # adapter.target_modules: every decoder projection / peft's per-model-type defaults
# units.groups.LINEAR_SUBCLASSES: subclasses of nn.Linear whose forward is still x @ W.T + b, so LoRA's x @ (B A).T
# adds exactly dW = B A to W. (An arbitrary subclass may compute something else -- quantised, sharded, scaled -- and
# is refused.)


class LoraAdapter:
    """Settings of `adapter=lora`; `wrap` injects the adapters, `merged_state_dict` and `save` export them."""

    def __init__(self, rank: int = 16, alpha: float = 32, dropout: float = 0.05,
                 target_modules: str | list[str] | tuple[str, ...] = AUTO):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"adapter.rank must be an integer >= 1, got {rank!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ConfigError(f"adapter.alpha must be a positive number, got {alpha!r}.")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {dropout!r}.")
        if target_modules in (AUTO, PEFT):
            targets = target_modules
        else:
            targets = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(f"adapter.target_modules must be `{AUTO}`, `{PEFT}` or a non-empty list of module "
                                  f"names (e.g. {list(LLAMA_TARGETS)}), got {target_modules!r}.")
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.target_modules = targets  # as configured: auto, peft or the names
        self.picked: list[str] = []  # the module names (last parts) the targets resolved to, set by wrap()
        self.transposed: set[str] = set()  # adapted Conv1D modules (weight stored (in, out)), set by wrap()
        self.scaling = self.alpha / self.rank
        self.modules: list[str] = []  # the adapted modules (names in the bare model), set by wrap()
        self.peft_config = None
        self.base_name = ""
        self.entries: dict[str, int] = {}

    # ------------------------------------------------------------------ setup
    def _targets(self, model: nn.Module, frozen_full: set[str]) -> list[str]:
        """Full names of the modules to adapt (see `candidate_modules`), minus wholly frozen ones."""
        candidates = self.candidate_modules(model)
        modules = dict(model.named_modules())
        self.picked = self.target_modules if isinstance(self.target_modules, list) else _short_names(candidates)
        self.transposed = {n for n in candidates if projection_kind(modules[n]) == "conv1d"}
        targets = [n for n in candidates if f"{n}.weight" not in frozen_full]  # wholly frozen: no adapter at all
        if not targets:
            raise ConfigError(f"adapter=lora: every module of adapter.target_modules={self.target_modules} "
                              f"({self.picked}) is wholly frozen by the freeze strategy, so no adapter would train.")
        return targets

    def candidate_modules(self, model: nn.Module) -> list[str]:
        """Full names of the modules `target_modules` names: `auto` = every Linear / Conv1D projection inside the
        decoder blocks; `peft` = peft's default names for the model type (`auto` where peft has none); a list =
        modules whose last name part is in it. Each must be a projection LoRA can adapt exactly."""
        mode, names = self.target_modules, None
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if mode == PEFT:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

            names = PEFT_DEFAULTS.get(model_type)
            if names is None:
                log.info("adapter.target_modules=peft: peft has no default targets for model_type=%r; using auto",
                         model_type)
        elif mode != AUTO:
            names = mode
        if names is None:
            found = block_projections(model)
            source = f"auto: the Linear / Conv1D projections of the decoder blocks of model_type={model_type!r}"
        else:
            found = _named_modules(model, names)
            source = f"peft's defaults for model_type={model_type!r}" if mode == PEFT else "adapter.target_modules"
        log.info("adapter=lora: target modules %s (%s)", _short_names(found), source)
        return found

    def wrap(self, model: nn.Module, masker: Masker | None = None) -> tuple[nn.Module, Masker | None]:
        """Inject LoRA layers into `model` (in place) and mask them like `masker`'s unit slices.

        Returns the model with adapters (an ordinary HF model; only the LoRA factors are trainable) and the Masker
        that holds the LoRA entries of frozen slices at zero (None when nothing needs masking)."""
        from peft import LoraConfig, get_peft_model

        partial = masker.partial if masker is not None else {}
        frozen_full = masker.frozen_full if masker is not None else set()
        self.modules = self._targets(model, frozen_full)
        self.base_name = str(getattr(model, "name_or_path", "") or "")
        # fan_in_fan_out: a Conv1D weight is (in, out); peft then transposes B @ A (it sets the flag per module
        # anyway, with a warning, when a model mixes Linear and Conv1D targets).
        self.peft_config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                      target_modules=list(self.modules), bias="none", task_type="CAUSAL_LM",
                                      fan_in_fan_out=bool(self.transposed) and self.transposed >= set(self.modules),
                                      base_model_name_or_path=self.base_name or None)
        # Sub-module names, not suffixes, so no other module can match (`layers.1.` vs `layers.11.`).
        model = get_peft_model(model, copy.deepcopy(self.peft_config)).get_base_model()
        adapted = sorted(n[: -len(".lora_A")] for n, _ in model.named_modules() if n.endswith(".lora_A"))
        if adapted != sorted(self.modules):
            raise RuntimeError(f"adapter=lora: peft adapted {adapted}, expected {sorted(self.modules)}.")
        lora_partial = self._zero_frozen_slices(model, partial)
        lora_masker = None
        if lora_partial:
            lora_masker = Masker(model, lora_partial, set(), mechanism=masker.mechanism,
                                 check_every_n_steps=masker.check_every_n_steps)
        self.entries = {"adapter": self.trainable_entries(model), "held_at_zero": held_at_zero(lora_partial, model)}
        log.info("adapter=lora: rank %d, alpha %g on %d modules; %s adapter entries, %s of them held at zero on "
                 "frozen unit slices", self.rank, self.alpha, len(self.modules), f"{self.entries['adapter']:,}",
                 f"{self.entries['held_at_zero']:,}")
        return model, lora_masker

    @torch.no_grad()
    def _zero_frozen_slices(self, model: nn.Module, partial: dict[str, PartialMask]) -> dict[str, PartialMask]:
        """Masks of the LoRA factors: B's rows of frozen output channels, A's columns of frozen input channels
        (zeroed now). A Linear weight is (out, in), a Conv1D weight (in, out): its unit dim is transposed."""
        params = dict(model.named_parameters())
        out = {}
        for name in self.modules:
            m = partial.get(f"{name}.weight")
            if m is None:
                continue
            out_dim = 1 if name in self.transposed else 0  # the weight's output-channel dimension
            factor, dim = ("lora_B", 0) if m.dim == out_dim else ("lora_A", 1)  # dW = B (out, r) @ A (r, in)
            pname = f"{name}.{factor}.{ADAPTER}.weight"
            p = params[pname]
            if p.shape[dim] != m.keep.numel():
                raise RuntimeError(f"adapter=lora: {pname} has {p.shape[dim]} entries along dim {dim}, the unit "
                                   f"mask of {name}.weight {m.keep.numel()}.")
            p.index_fill_(dim, m.frozen_index().to(p.device), 0.0)  # A's init is random; B's is zero anyway
            out[pname] = PartialMask(pname, dim, m.keep.clone(), tuple(p.shape))
        return out

    @staticmethod
    def trainable_entries(model: nn.Module) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad)

    def describe(self) -> dict:
        return {"type": "lora", "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.picked) or self.target_modules, "targets_from": self.source(),
                "modules_adapted": len(self.modules),
                "entries": dict(self.entries)}

    def source(self) -> str:
        return self.target_modules if isinstance(self.target_modules, str) else "list"

    # ------------------------------------------------------------------ export
    def merged_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The bare model's state dict with each W replaced by W + scaling * B @ A (computed in float32, cast back
        to W's dtype). On a frozen slice B @ A is exactly 0, so W comes back bit-identical."""
        out = {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}
        for name in self.modules:
            a = sd[f"{name}.lora_A.{ADAPTER}.weight"].float()
            b = sd[f"{name}.lora_B.{ADAPTER}.weight"].float()
            w, delta = out[f"{name}.weight"], b @ a
            out[f"{name}.weight"] = (w.float() + self.scaling * (delta.T if name in self.transposed else delta)).to(
                w.dtype)
        return out

    def save(self, out_dir: str | Path, sd: dict[str, torch.Tensor]) -> Path:
        """The adapter in PEFT format (adapter_config.json + adapter_model.safetensors), from a (gathered) state
        dict of the model with adapters: `PeftModel.from_pretrained(base, out_dir)` loads it."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.peft_config)
        config.inference_mode = True
        config.save_pretrained(str(out))
        suffix = f".{ADAPTER}.weight"
        tensors = {f"base_model.model.{k[: -len(suffix)]}.weight": v.detach().cpu().contiguous()
                   for k, v in sd.items() if ".lora_" in k and k.endswith(suffix)}
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        return out


@torch.no_grad()
def match_base_dtype(model: nn.Module) -> int:
    """Give every LoRA factor the dtype of its base layer's weight, in place; returns the number of factors cast.

    For strategies that flatten parameters (FSDP; CausalLMModule.setup calls this before the strategy wraps the
    model): a flat parameter holds one dtype, but peft keeps the factors in float32 next to a bf16 / fp16 base
    (its autocast_adapter_dtype), and FSDP refuses to flatten the mix ("Must flatten tensors with uniform dtype").
    The factors follow the base, not the other way round: the base weights stay in the dtype they were loaded (and
    are exported) in, and under FSDP's bf16-mixed with a bf16 load every parameter already computes and updates in
    bf16. Masks stay exact in any dtype: held entries start at exactly 0, their gradient is masked to 0 (so Adam's
    update is 0) and their decay factor is exactly 1, so the merged frozen slices stay bit-identical.
    DDP and DeepSpeed keep peft's float32 factors (this is not called there).
    """
    from peft.tuners.lora import LoraLayer

    cast = 0
    for mod in model.modules():
        if not isinstance(mod, LoraLayer):
            continue
        dtype = mod.get_base_layer().weight.dtype
        if not dtype.is_floating_point:
            continue
        for factors in (mod.lora_A, mod.lora_B):
            for factor in factors.values():
                if factor.weight.dtype != dtype:
                    factor.to(dtype)  # in place (param.data), so masks and hooks keep their parameter objects
                    cast += 1
    if cast:
        log.info("adapter=lora: %d LoRA factors cast to the base weights' dtype for FSDP", cast)
    return cast


def held_at_zero(lora_partial: dict[str, PartialMask], model: nn.Module) -> int:
    """LoRA factor entries masked to zero (B's frozen rows, A's frozen columns)."""
    params = dict(model.named_parameters())
    return sum(int((~m.keep).sum()) * (params[n].numel() // params[n].shape[m.dim]) for n, m in lora_partial.items())


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a Linear applies: W, plus dW for a module with a LoRA adapter (detached)."""
    from peft.tuners.lora import LoraLayer

    w = module.weight.detach()
    if isinstance(module, LoraLayer) and ADAPTER in module.lora_A and not module.merged:
        return (w.float() + module.get_delta_weight(ADAPTER).detach().float()).to(w.dtype)
    return w


def projection_kind(module: nn.Module) -> str | None:
    """"linear" for nn.Linear (and the whitelisted subclasses), "conv1d" for transformers' Conv1D (GPT-2: weight
    (in, out), y = x @ W + b), None for anything LoRA cannot adapt exactly."""
    from transformers.pytorch_utils import Conv1D

    if type(module) is nn.Linear or (isinstance(module, nn.Linear) and type(module).__name__ in LINEAR_SUBCLASSES):
        return "linear"
    return "conv1d" if isinstance(module, Conv1D) else None


def block_projections(model: nn.Module) -> list[str]:
    """Full names of the Linear / Conv1D modules inside the decoder blocks (not the embeddings or lm_head): the
    blocks of safety_units.units.layouts.decoder_layers, else the model's ModuleList of num_hidden_layers blocks."""
    try:
        layers = decoder_layers(model)
    except ConfigError:
        layers = None
    names = {id(m): n for n, m in model.named_modules()}
    if layers is None:
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers
                       and any(projection_kind(x) for x in m.modules())), None)
    if layers is None:
        raise ConfigError(f"adapter.target_modules=auto: no decoder blocks found in this model (model_type="
                          f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}); list the module "
                          f"names in adapter.target_modules.")
    prefix = names[id(layers)]
    return [f"{prefix}.{n}" for n, m in layers.named_modules() if projection_kind(m)]


def _named_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Full names of the modules whose last name part is in `names`; each must be a projection LoRA can adapt."""
    found, seen = [], set()
    for name, mod in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in names:
            continue
        seen.add(short)
        if projection_kind(mod) is None:
            raise ConfigError(f"adapter.target_modules: {name} is a {type(mod).__name__}; adapter=lora supports "
                              f"torch.nn.Linear, {', '.join(LINEAR_SUBCLASSES)} and GPT-2 style Conv1D modules.")
        found.append(name)
    missing = [t for t in names if t not in seen]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if projection_kind(m)})
        raise ConfigError(f"adapter.target_modules: no module named {missing} in this model; its Linear / Conv1D "
                          f"modules are {linear}.")
    return found


def _short_names(full: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in full}, key=_short_order)


def _short_order(short: str) -> tuple:
    """Llama's names in their usual order (q, k, v, o, gate, up, down), then the rest alphabetically."""
    return (LLAMA_TARGETS.index(short), "") if short in LLAMA_TARGETS else (len(LLAMA_TARGETS), short)
