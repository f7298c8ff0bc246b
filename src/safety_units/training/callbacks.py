"""Lightning callbacks of a training run: Ctrl-C checkpoint, frozen-entry check and final export, and the
before/after evaluation (callbacks=eval; the unit-drift monitor, callbacks=drift, is safety_units.training.drift)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import torch

from safety_units.evaluation.compare import compare_table
from safety_units.models.sharded import weights_sharded
from safety_units.evaluation.suite import log_results, run_suite
from safety_units.steering.steerer import build_steerer, steering
from safety_units.utils.ranks import RankedLogger
from safety_units.utils.run_logging import Stopwatch, log_images, log_params, set_summary
from safety_units.evaluation.run_tables import change_summary, eval_summary, log_completions, read_generations
from safety_units.data.sources import normalize_prompt
from safety_units.evaluation.task_results import judge_name, markdown_table
from safety_units.units.unit_map import save_selection

log = RankedLogger(__name__)


class InterruptCheckpoint(pl.Callback):
    """Ctrl-C saves `interrupted.ckpt` in the checkpoint dir, resumable with ckpt_path=..."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt):
            path = self.dirpath / "interrupted.ckpt"
            trainer.save_checkpoint(path)
            log.warning("interrupted: saved %s; resume with ckpt_path=%s", path, path)


def full_state_dict(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor] | None:
    """The HF model's full state dict on rank 0 (gathered under ZeRO-3 / FSDP); None on other ranks.

    Collective under sharded strategies: every rank must call it.
    """
    strategy = trainer.strategy
    name = type(strategy).__name__
    model = pl_module.model
    if name == "DeepSpeedStrategy" and getattr(strategy, "zero_stage_3", False):
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if trainer.is_global_zero else None
        return sd
    if name == "FSDPStrategy":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = strategy.model
        cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, cfg):
            sd = wrapped.state_dict()
        if not trainer.is_global_zero:
            return None
        prefix = "model."
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not trainer.is_global_zero:
        return None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


class FinalizeRun(pl.Callback):
    """At the end of fit: check frozen entries against the load-time snapshot, then export `model/`.

    The export is a Hugging Face directory (safetensors + tokenizer) plus a copy of the unit map, the unit set the
    strategy froze or trained (`frozen_units.safetensors` / `trained_units.safetensors`) and the resolved config,
    loadable with `AutoModelForCausalLM.from_pretrained`. With an adapter (`adapter=lora`) `model/` holds the merged
    weights -- the frozen check reads those -- and `model/adapter/` the adapter in PEFT format, with the same files.
    """

    def __init__(self, output_dir: str, tokenizer, resolved_config: str, unit_map_path: str | None = None,
                 export: bool = True, masker=None, adapter=None):
        self.output_dir = Path(output_dir)
        self.tokenizer = tokenizer
        self.resolved_config = resolved_config
        self.unit_map_path = unit_map_path
        self.export = export
        self.masker = masker  # its snapshot holds the frozen entries as loaded
        self.adapter = adapter
        self.summary: dict = {}

    def on_train_end(self, trainer, pl_module):
        sd = full_state_dict(trainer, pl_module)
        weights = self.adapter.merged_state_dict(sd) if self.adapter is not None and sd is not None else sd
        masker = self.masker
        if weights is not None and masker is not None and masker.has_frozen_entries:
            delta = masker.frozen_max_abs_delta(weights)
            self.summary["frozen_max_abs_delta"] = delta
            self.summary["trainable_changed"] = masker.trainable_changed(weights)
            log.info("frozen_max_abs_delta = %r (0.0 means every frozen entry is bit-identical to its loaded value)",
                     delta)
            for lg in trainer.loggers:
                lg.log_metrics({"freeze/frozen_max_abs_delta": delta}, step=trainer.global_step)
        if sd is None or not self.export:
            return
        out = self.output_dir / "model"
        out.mkdir(parents=True, exist_ok=True)
        pl_module.model.save_pretrained(out, state_dict=weights, safe_serialization=True)
        self._write_companions(out)
        if self.adapter is not None:
            self._write_companions(self.adapter.save(out / "adapter", sd))
        log.info("exported the trained model to %s", out)

    def _write_companions(self, out: Path) -> None:
        """Tokenizer, resolved config, unit map, the exact unit set and the frozen check, beside the weights."""
        self.tokenizer.save_pretrained(out)
        (out / "safety_units_config.yaml").write_text(self.resolved_config)
        if self.unit_map_path:
            for f in Path(self.unit_map_path).parent.glob("unit_map.*"):
                shutil.copy2(f, out / f.name)
        masker = self.masker
        if masker is not None and masker.selection is not None:  # the exact unit set, e.g. a planted one
            role = "trained" if masker.mode == "train_only" else "frozen"
            save_selection(masker.selection, out / f"{role}_units.safetensors", masker.describe() | {"role": role})
        if self.summary:
            (out / "freeze_check.json").write_text(json.dumps(self.summary, indent=2))


class EvalCallback(pl.Callback):
    """Runs an eval suite before and after training (on rank 0) and writes eval_compare.md (compare_table).

    Configured by callbacks=eval; the tokenizer comes from the LightningModule (`pl_module.tokenizer`). Both
    evaluations see the same prompts; the run's training prompts are counted (extra.train_overlap), not removed.
    """

    def __init__(self, suite, judge, output_dir: str | Path, before: bool = True, after: bool = True, steer=None):
        self.suite, self.judge, self.steer = suite, judge, build_steerer(steer)  # Hydra hands a Steerer (or None)
        self.output_dir = Path(output_dir)
        self.before, self.after = before, after
        self.results: dict[str, dict] = {}

    def _run(self, trainer, pl_module, when: str):
        if weights_sharded(trainer.strategy):
            log.warning("eval callback: weights are sharded under %s; evaluate the exported model with "
                        "`python evaluate.py model=hf model.path=<run dir>/model` instead",
                        type(trainer.strategy).__name__)
            return
        if trainer.is_global_zero:
            dm = trainer.datamodule
            train = {normalize_prompt(p) for p in dm.prompts()} if hasattr(dm, "prompts") else None
            with steering(pl_module.model, pl_module.tokenizer, self.steer) as steer:  # fitted on the current weights
                res = run_suite(pl_module.model, pl_module.tokenizer, self.suite, self.judge, train,
                                self.output_dir, prefix=f"eval_{when}")
            if self.steer.active:
                (self.output_dir / f"eval_{when}_steer.json").write_text(json.dumps(steer, indent=2))
            self.results[when] = {k: asdict(v) for k, v in res.items()}
            log_results(trainer.loggers, res, prefix=f"eval_{when}", step=trainer.global_step)
            if when == "after" and "before" in self.results:
                table = compare_table(self.results["before"], self.results["after"], judge_name(self.judge))
                (self.output_dir / "eval_compare.md").write_text(table + "\n")
                print("\nbefore / after training:\n" + table + "\n", flush=True)
            else:
                print(f"\n{when} training:\n" + markdown_table(res) + "\n", flush=True)
            if when == "after" or not self.after:  # the last evaluation: the completions side by side
                with Stopwatch():
                    rows = {w: read_generations(self.output_dir / f"generations_eval_{w}.jsonl") for w in self.results}
                    log_completions(trainer.loggers, rows, int(self.suite.get("log_completions") or 0),
                                    int(self.suite.get("seed", 0)), step=trainer.global_step)
        trainer.strategy.barrier()

    def on_fit_start(self, trainer, pl_module):
        if self.before and not trainer.ckpt_path:
            self._run(trainer, pl_module, "before")

    def on_train_end(self, trainer, pl_module):
        if self.after:
            self._run(trainer, pl_module, "after")


class RunSummary(pl.Callback):
    """What a sweep's dashboard shows of this run (safety_units.utils.run_logging): the params once at the start, the
    unit map's and drift's plots, and at the end the summary -- eval before / after / change / paired p,
    frozen_max_abs_delta, wall time and tokens/s. Added by training.fit after FinalizeRun and the config's callbacks,
    so it reads their results; rank zero logs and writes params.json / summary.json. time/wall_s runs from the
    run's start (`started_at`: model load and data included) to its end, time/train_s over the training batches
    (tokens/s: attended tokens of every rank's batches over that time)."""

    def __init__(self, output_dir: str, params: dict, images: dict[str, str] | None = None, finalize=None,
                 started_at: float | None = None):
        self.output_dir = Path(output_dir)
        self.params, self.images, self.finalize = params, dict(images or {}), finalize
        self.started_at = started_at if started_at is not None else time.time()  # the run's start (wall clock)
        self.tokens = 0
        self.t_train = self.t_last = None

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            with Stopwatch():
                log_params(trainer.loggers, self.params, self.output_dir)
                log_images(trainer.loggers, self.images, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module):
        self.t_train, self.tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.tokens += int(batch["attention_mask"].sum())
        self.t_last = time.perf_counter()  # training time ends with the last batch, before the after-evaluation

    def on_train_end(self, trainer, pl_module):
        # every rank counted its own batches: the sum is collective, so every rank takes part
        tokens = int(trainer.strategy.reduce(torch.tensor(float(self.tokens), device=pl_module.device),
                                             reduce_op="sum"))
        if not trainer.is_global_zero:
            return
        train_s = (self.t_last - self.t_train) if self.t_last and self.t_train else 0.0
        summary = {"time/wall_s": round(time.time() - self.started_at, 3), "time/train_s": round(train_s, 3),
                   "train/tokens": tokens, "train/tokens_per_s": round(tokens / train_s, 2) if train_s > 0 else None,
                   "train/global_step": trainer.global_step}
        check = self.finalize.summary if self.finalize is not None else {}
        if "frozen_max_abs_delta" in check:
            summary |= {"freeze/frozen_max_abs_delta": check["frozen_max_abs_delta"],
                        "freeze/trainable_changed": check["trainable_changed"]}
        for cb in trainer.callbacks:
            if isinstance(cb, EvalCallback) and cb.results:
                res = cb.results
                summary |= change_summary(res["before"], res["after"]) if {"before", "after"} <= set(res) else \
                    eval_summary(next(iter(res.values())))
        with Stopwatch():
            set_summary(trainer.loggers, summary, self.output_dir, step=trainer.global_step)
            log_images(trainer.loggers, {"plots/drift": self.output_dir / "drift.png"}, step=trainer.global_step)
