"""The LightningModule: a Hugging Face causal LM, AdamW + warmup/cosine, optional gradient masks (FSDP-aware:
masks attach by unwrapped names, clipping by norm goes through the FSDP root, LoRA factors take the base dtype)."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import torch

from safety_units.models.sharded import weights_sharded
from safety_units.utils.errors import ConfigError, NonFiniteLossError
from safety_units.models.lora import match_base_dtype
from safety_units.units.masking import live_params, is_fsdp
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)

# Overriding configure_gradient_clipping (for FSDP, below) makes Lightning's DeepSpeed strategy warn that the hook
# "will not actually clip gradients". Under DeepSpeed the override defers to Lightning's default, and DeepSpeed
# clips by norm itself (its config's gradient_clipping = trainer.gradient_clip_val), so the warning is moot.
warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")


def _restore_fsdp_param_views(root) -> int:
    """Give FSDP units that backward left with forward-time views their original Parameters back; returns how many.

    torch FSDP (use_orig_params=True) swaps each original parameter for a plain Tensor view in forward and swaps
    the Parameter back when the unit reshards after backward. A unit none of whose parameters gets a gradient -- the
    root's embeddings, norms and tied lm_head, frozen under ru_only / train_only and with adapter=lora -- runs no
    post-backward hook, and under NO_SHARD (FSDP on one device) the final catch-all reshard takes it for resharded
    (same storage), so the views stay: the masked decay's summon_full_params and the export's full state dict then
    fail on the tied embedding ("as_params=True type(prim_param)=<class 'torch.Tensor'>"), and the next unshard
    adopts the plain Tensors as the unit's parameters. Uses FSDP's private handle API: a no-op where it is absent,
    and for units whose Parameters are in place (every unit under a sharded strategy, trainable units always).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    restored = 0
    for unit in FSDP.fsdp_modules(root):
        handle = getattr(unit, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        params, infos = getattr(flat, "_params", None), getattr(flat, "_param_infos", None)
        if not params or infos is None or not getattr(handle, "_use_orig_params", False) \
                or not hasattr(handle, "_use_sharded_views"):
            continue
        if any(getattr(mod, name, None) is not p for p, (name, mod, *_) in zip(params, infos)):
            handle._use_sharded_views()
            restored += 1
    return restored


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(min_lr_ratio, 1.0 - progress * (1.0 - min_lr_ratio))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"optim.schedule must be constant, linear or cosine, got {schedule!r}.")


class CausalLMModule(pl.LightningModule):
    """`model` trained with the optimizer settings of cfg.optim. `tokenizer` (for callbacks that generate or
    calibrate) and `unit_map` (the map `masker` was built from, None without one: callbacks=drift classifies with
    its settings) are what the run's callbacks read from the module. `objective` (defense=vaccine / booster / lisa)
    replaces the plain loss of a training step."""

    def __init__(self, model: torch.nn.Module, lr: float = 2e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, warmup_steps: int = 0,
                 warmup_ratio: float = 0.0, schedule: str = "cosine", min_lr_ratio: float = 0.1,
                 masker=None, tokenizer=None, unit_map=None, objective=None):
        super().__init__()
        self.objective = objective  # a defense's training objective (safety_units.defenses: Vaccine, Booster, Lisa); None: the LM loss
        self.tokenizer, self.unit_map = tokenizer, unit_map
        if lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {lr}.")
        if weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {weight_decay}.")
        self.model = model.train()  # from_pretrained returns eval mode; dropout (GPT-2) must be on for training
        self.masker = masker
        # Parameter ranks as built, by unwrapped name. Under FSDP (world size > 1) configure_optimizers runs after
        # wrapping, when every original parameter is a 1-D view of its shard: `p.ndim < 2` would exempt all weights
        # from decay (the masked decay too).
        self._param_ndim = {n: p.ndim for n, p in live_params(model).items()}
        self.hparams_optim = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                                  warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, schedule=schedule,
                                  min_lr_ratio=min_lr_ratio)

    # ------------------------------------------------------------------ masks are attached per process
    def setup(self, stage: str) -> None:
        # Lightning calls this before the strategy wraps the model (Trainer._run: setup hook, configure_model, then
        # strategy.setup), and again for a later trainer.validate/test, when FSDP's auto-wrap has already replaced
        # the decoder layers inside self.model: Masker.attach resolves the unwrapped names either way.
        strategy = self.trainer.strategy if self._trainer is not None else None
        if is_fsdp(strategy):
            match_base_dtype(self.model)  # FSDP flattens each unit into one dtype; no-op without LoRA adapters
        # Registered here, not in __init__: ddp_spawn pickles the module and tensor hooks do not survive that.
        if self.masker is not None:
            self.masker.attach(self.model, strategy=strategy)

    def forward(self, **batch):
        return self.model(**batch)

    # ------------------------------------------------------------------ resume: the same dropout masks
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_state"] = {"cpu": torch.get_rng_state(),
                                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_rng = checkpoint.get("rng_state")

    def on_train_batch_start(self, batch, batch_idx):
        # Restored at the first batch, not at load: building the data iterator in between draws from the RNG.
        rng = getattr(self, "_resume_rng", None)
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._resume_rng = None

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss if self.objective is None else self.objective.loss(self, batch)
        if not torch.isfinite(loss):
            ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or \
                getattr(self.trainer.checkpoint_callback, "best_model_path", "") or "none saved yet"
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); stopping. The last good checkpoint is: {ckpt}. Lower optim.lr, raise "
                f"warmup, or check the data for empty or extremely long examples."
            )
        n_tokens = (batch["labels"] != -100).sum()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        self.log("train/response_tokens", n_tokens.float(), on_step=True, on_epoch=False, reduce_fx="sum")
        for key, value in getattr(self.objective, "last_terms", {}).items():
            self.log(key, value, on_step=True, on_epoch=False)
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        m = self.masker
        every = getattr(m, "check_every_n_steps", 0) if m is not None else 0
        if not every or (batch_idx + 1) % self.trainer.accumulate_grad_batches or self.global_step % every:
            return
        if weights_sharded(self.trainer.strategy):
            return  # checked once, gathered, at the end of training
        self.log("freeze/frozen_max_abs_delta", m.frozen_max_abs_delta(self.model.state_dict()), on_step=True)

    def validation_step(self, batch, batch_idx):
        if "ref_logps" in batch:  # objective=dpo / unlearning rows: the objective's loss is the validation loss
            loss = self.objective.loss(self, batch)
        else:
            loss = self.model(**batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        o = self.hparams_optim
        decay, no_decay, masked_decay = [], [], []
        masked = self.masker.partially_masked_params(self.model) if self.masker is not None else set()
        for name, p in live_params(self.model).items():
            if not p.requires_grad:
                continue
            if self._param_ndim.get(name, p.ndim) < 2 or "norm" in name.lower() or name.endswith(".bias"):
                no_decay.append(p)
            elif id(p) in masked and o["weight_decay"] > 0:
                masked_decay.append(p)  # decayed by the masker, only on trainable entries
            else:
                decay.append(p)
        if not (decay or no_decay or masked_decay):
            raise ConfigError("nothing to train: every parameter is frozen by the chosen freeze strategy.")
        groups = [{"params": decay, "weight_decay": o["weight_decay"]},
                  {"params": no_decay, "weight_decay": 0.0},
                  {"params": masked_decay, "weight_decay": 0.0, "masked_weight_decay": o["weight_decay"]}]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=o["lr"], betas=o["betas"], eps=o["eps"])
        total = self._total_steps()
        warmup = o["warmup_steps"] or int(round(o["warmup_ratio"] * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, warmup, total, o["schedule"], o["min_lr_ratio"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_steps(self) -> int:
        """Optimizer steps of the whole run, for the schedule.

        Not `trainer.estimated_stepping_batches`: that builds the train dataloader before a checkpoint is restored,
        so Lightning would never hand the saved data position to the loader and a mid-epoch resume would replay
        the epoch's first batches.
        """
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        dm = trainer.datamodule
        n = len(dm.train_set) if dm is not None and getattr(dm, "train_set", None) is not None else None
        if n is None:
            return max(1, int(trainer.estimated_stepping_batches))
        per_rank = math.ceil(n / max(1, trainer.world_size) / dm.batch_size)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            per_rank = min(per_rank, limit)
        elif limit is not None:
            per_rank = int(per_rank * float(limit))
        return max(1, math.ceil(per_rank / trainer.accumulate_grad_batches) * max(1, trainer.max_epochs or 1))

    def on_after_backward(self) -> None:
        strategy = self.trainer.strategy
        if is_fsdp(strategy) and strategy.model is not None:
            _restore_fsdp_param_views(strategy.model)  # before anything unshards again (masked decay, export)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.masker is not None:
            self.masker.apply_masked_weight_decay(optimizer, self.model, self.trainer.strategy)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by norm under FSDP through the root FSDP module; Lightning's default path everywhere else.

        Lightning's FSDPPrecision.clip_grad_by_norm raises ("gradient_clip_algorithm='norm' is currently not
        supported"): torch's clip_grad_norm_ over local shards would clip by a per-rank norm, and the precision plugin
        has no handle on the root module. The strategy has: `strategy.model` is the FSDP root that wraps this module,
        and its clip_grad_norm_ all-reduces the norm over the shards. Lightning calls this hook after
        on_before_optimizer_step (masked weight decay) and before optimizer.step; the gradients it sees are already
        masked (the masks act in backward), so frozen entries stay 0 whatever the clip coefficient.
        """
        strategy = self.trainer.strategy
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm").lower()
        if not is_fsdp(strategy) or not gradient_clip_val or gradient_clip_val <= 0 or algorithm != "norm":
            # clipping by value is elementwise, so it is exact on shards: Lightning's default handles it
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)
            return
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = strategy.model
        if not isinstance(root, FSDP):
            raise ConfigError(f"gradient clipping by norm under {type(strategy).__name__} needs the LightningModule "
                              f"wrapped in one root FSDP module (got {type(root).__name__}); set "
                              f"trainer.gradient_clip_val=null or let the strategy wrap the whole module.")
        root.clip_grad_norm_(gradient_clip_val)
