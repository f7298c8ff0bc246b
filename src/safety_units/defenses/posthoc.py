"""What the post-hoc defenses (`defense=safelora`, `defense=antidote`) share: they act on the fine-tuning update
dW = W - W_aligned (W_aligned: the weights as loaded) of each decoder layer's q/k/v/o/gate/up/down weight.
`PostHocDefense` is a Lightning callback: it snapshots W_aligned at setup and, at the end of fit (before the export),
computes dW and hands it to its subclass's `edit`, which writes the defended weights back."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from safety_units.defenses.base import Defense
from safety_units.models.lora import ADAPTER, LLAMA_TARGETS, effective_weight
from safety_units.models.sharded import weights_sharded
from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)

_LAYER = re.compile(r"(^|\.)\d+\.")  # a decoder layer's index in a module name (`model.layers.3.`)


def bare_model(model: nn.Module) -> nn.Module:  # the HF model inside a PeftModel (names without `base_model.model.`)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def target_weights(model: nn.Module, modules: tuple[str, ...] = LLAMA_TARGETS) -> dict[str, nn.Module]:
    """{`model.layers.3.mlp.down_proj.weight`: module} for the decoder layers' Linear modules named in `modules`
    (last name part). A module with a LoRA adapter is peft's LoRA Linear (its `.weight` is the base weight;
    safety_units.models.lora.effective_weight gives W + dW); a PeftModel is named by its base model's names."""
    out = {}
    for name, mod in bare_model(model).named_modules():
        if name.rsplit(".", 1)[-1] not in modules or not _LAYER.search(name):
            continue
        base = mod.get_base_layer() if isinstance(mod, LoraLayer) else mod
        if type(base) is not nn.Linear:
            raise ConfigError(f"post-hoc defense: {name} is a {type(base).__name__}; the defenses support "
                              f"torch.nn.Linear modules (Llama-style models).")
        out[f"{name}.weight"] = mod
    if not out:
        raise ConfigError(f"post-hoc defense: no decoder-layer Linear module named {list(modules)} in this model.")
    return out


def adapted(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) and ADAPTER in module.lora_A and not module.merged


def update_of(module: nn.Module, start: Tensor, device) -> Tensor:
    """dW = W + s B A - W_aligned in float32; LoRA's s B A taken unrounded (not through a bf16 merged weight)."""
    w = module.weight.detach().to(device, torch.float32) - start.to(device, torch.float32)
    if adapted(module):
        w += module.get_delta_weight(ADAPTER).detach().to(device, torch.float32)
    return w


@torch.no_grad()
def update_norm(model: nn.Module, start: nn.Module) -> float:
    """||W - W_start||_F over the decoder layers' target matrices (target_weights; LoRA's s B A included): how far a
    fine-tune or a defense moved the model, the drift the matched-drift control matches."""
    ref = target_weights(start)
    total = 0.0
    for n, mod in target_weights(model).items():
        w = ref[n].weight if n in ref else None
        if w is None:
            raise ValueError(f"update_norm: the reference model has no {n}")
        total += float(update_of(mod, w, "cpu").double().pow(2).sum())
    return total ** 0.5


def checked_number(value, key: str, integer: bool, what: str, *checks):
    """`value` of defense.<key> when it is a number (an int if `integer`) that passes `checks`; else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or not all(c(value) for c in checks):
        raise ConfigError(f"defense.{key} must be {what}, got {value!r}.")
    return value


class PostHocDefense(Defense, pl.Callback):
    """A defense applied once, at the end of fit, before the export (stage: post). Subclasses implement `edit` (write
    the defended weights) and `summary_line`, and name the report's count in `count_key`. `self.report`: the
    report of the edit (rank zero; {} elsewhere), also recorded in the run's summary."""

    count_key: str  # the report's count of changed matrices or entries, logged as defense/<count_key>

    def __init__(self, name: str, stage: str = "post"):
        super().__init__(name, stage)
        if stage != "post":
            raise ConfigError(f"defense.stage: defense={name} runs after fine-tuning (stage: post), got {stage!r}.")
        self.tokenizer, self.start, self.report = None, None, {}  # start: {name: W_aligned (CPU)}

    def callbacks(self, tokenizer) -> list:
        self.tokenizer = tokenizer
        return [self]

    def summary(self) -> dict:
        return {"name": self.name, "stage": self.stage, "report": self.report}

    def edit(self, model: nn.Module, targets: dict[str, nn.Module], start: dict[str, Tensor],
             delta: dict[str, Tensor], tokenizer, device) -> dict:
        """Write the defended weights into `targets` (target_weights) from the updates `delta` (float32, only the
        matrices that trained) and W_aligned `start`; returns the report."""
        raise NotImplementedError

    def summary_line(self, report: dict) -> str:
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, model: nn.Module, start: dict[str, Tensor], tokenizer, device) -> dict:
        """Apply the defense to `model` (HF model, with LoRA layers or a PeftModel) in place; returns the report.
        dW = effective weight - start; matrices with dW = 0 (not trained: frozen layers, no adapter) are left out."""
        targets = target_weights(model)
        if set(start) - set(targets):
            raise ValueError(f"{self.name}: the model lacks snapshot weights {sorted(set(start) - set(targets))}")
        delta = {n: update_of(targets[n], start[n], device) for n in start}
        delta = {n: d for n, d in delta.items() if bool(d.any())}
        report = self.edit(model, targets, start, delta, tokenizer, device)
        report.update(defense=self.name, targets=len(targets), trained=len(delta))
        return report

    # ------------------------------------------------------------------ the Lightning hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        # Taken here, not at on_fit_start: Lightning restores a checkpoint's weights between the two (ckpt_path
        # resume), and the snapshot must be W_aligned as loaded. CPU copies; a single copy on rank zero.
        if stage != "fit":
            return
        if weights_sharded(trainer.strategy):
            raise ConfigError(f"defense={self.name} needs the whole model on one rank; it does not run "
                              f"under {type(trainer.strategy).__name__} (use a single device, DDP or ZeRO-1/2).")
        if trainer.is_global_zero:
            self.start = {n: effective_weight(m).detach().to("cpu", copy=True)
                          for n, m in target_weights(pl_module.model).items()}

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:  # the export reads rank zero's weights
            return
        self.report = self.apply(pl_module.model, self.start, self.tokenizer or getattr(pl_module, "tokenizer", None),
                                 pl_module.device)
        log.info(self.summary_line(self.report))
        for lg in trainer.loggers:
            lg.log_metrics({f"defense/{self.count_key}": float(self.report[self.count_key])}, step=trainer.global_step)
