"""LoRA adapters (`adapter=lora`, via peft) that compose exactly with unit freezing.

A LoRA module adds dW = scaling * B @ A to its weight W (out, in), with B (out, r) starting at zero and A (r, in)
random. A frozen unit slice of W gets dW = 0 exactly:

* a frozen row j (gate_proj / up_proj of MLP unit j): row j of B is held at zero, so dW[j] = B[j] @ A = 0;
* a frozen column j (down_proj of MLP unit j, o_proj of attention unit j): column j of A is held at zero, so
  dW[:, j] = B @ A[:, j] = 0.

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
from safety_units.units.masking import Masker, PartialMask
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)

ADAPTER = "default"  # peft's name of the (only) adapter
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraAdapter:
    """Settings of `adapter=lora`; `wrap` injects the adapters, `merged_state_dict` and `save` export them."""

    def __init__(self, rank: int = 16, alpha: float = 32, dropout: float = 0.05,
                 target_modules: list[str] | tuple[str, ...] = LLAMA_TARGETS):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"adapter.rank must be an integer >= 1, got {rank!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ConfigError(f"adapter.alpha must be a positive number, got {alpha!r}.")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {dropout!r}.")
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"adapter.target_modules must be a non-empty list of module names (e.g. "
                              f"{list(LLAMA_TARGETS)}), got {target_modules!r}.")
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.target_modules = targets
        self.scaling = self.alpha / self.rank
        self.modules: list[str] = []  # the adapted modules (names in the bare model), set by wrap()
        self.peft_config = None
        self.base_name = ""
        self.entries: dict[str, int] = {}

    # ------------------------------------------------------------------ setup
    def _targets(self, model: nn.Module, frozen_full: set[str]) -> list[str]:
        """Full names of the modules to adapt: target_modules by last name part, minus wholly frozen ones."""
        found, targets = set(), []
        for name, mod in model.named_modules():
            short = name.rsplit(".", 1)[-1]
            if short not in self.target_modules:
                continue
            found.add(short)
            if type(mod) is not nn.Linear:  # exact type: a subclass may compute something else than x @ W.T
                raise ConfigError(f"adapter.target_modules: {name} is a {type(mod).__name__}; adapter=lora "
                                  f"supports torch.nn.Linear modules (Llama-style models).")
            if f"{name}.weight" not in frozen_full:  # wholly frozen: no adapter at all
                targets.append(name)
        missing = [t for t in self.target_modules if t not in found]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(f"adapter.target_modules: no module named {missing} in this model; its Linear "
                              f"modules are {linear}.")
        if not targets:
            raise ConfigError(f"adapter=lora: every module of adapter.target_modules={self.target_modules} is "
                              f"wholly frozen by the freeze strategy, so no adapter would train.")
        return targets

    def wrap(self, model: nn.Module, masker: Masker | None = None) -> tuple[nn.Module, Masker | None]:
        """Inject LoRA layers into `model` (in place) and mask them like `masker`'s unit slices.

        Returns the model with adapters (an ordinary HF model; only the LoRA factors are trainable) and the Masker
        that holds the LoRA entries of frozen slices at zero (None when nothing needs masking)."""
        from peft import LoraConfig, get_peft_model

        partial = masker.partial if masker is not None else {}
        frozen_full = masker.frozen_full if masker is not None else set()
        self.modules = self._targets(model, frozen_full)
        self.base_name = str(getattr(model, "name_or_path", "") or "")
        self.peft_config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                      target_modules=list(self.modules), bias="none", task_type="CAUSAL_LM",
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
        """Masks of the LoRA factors: B's rows of frozen rows, A's columns of frozen columns (zeroed now)."""
        params = dict(model.named_parameters())
        out = {}
        for name in self.modules:
            m = partial.get(f"{name}.weight")
            if m is None:
                continue
            factor = "lora_B" if m.dim == 0 else "lora_A"  # rows of W live in B, columns in A
            pname = f"{name}.{factor}.{ADAPTER}.weight"
            p = params[pname]
            p.index_fill_(m.dim, m.frozen_index().to(p.device), 0.0)  # A's init is random; B's is zero anyway
            out[pname] = PartialMask(pname, m.dim, m.keep.clone(), tuple(p.shape))
        return out

    @staticmethod
    def trainable_entries(model: nn.Module) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad)

    def describe(self) -> dict:
        return {"type": "lora", "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": self.target_modules, "modules_adapted": len(self.modules),
                "entries": dict(self.entries)}

    # ------------------------------------------------------------------ export
    def merged_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The bare model's state dict with each W replaced by W + scaling * B @ A (computed in float32, cast back
        to W's dtype). On a frozen slice B @ A is exactly 0, so W comes back bit-identical."""
        out = {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}
        for name in self.modules:
            a = sd[f"{name}.lora_A.{ADAPTER}.weight"].float()
            b = sd[f"{name}.lora_B.{ADAPTER}.weight"].float()
            w = out[f"{name}.weight"]
            out[f"{name}.weight"] = (w.float() + self.scaling * (b @ a)).to(w.dtype)
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
