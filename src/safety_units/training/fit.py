"""What `python train.py` runs: load model and data, build the freezing masks, fit, check, export."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from safety_units.training.callbacks import EvalCallback, FinalizeRun, InterruptCheckpoint, RunSummary
from safety_units.utils.config import (
    finish_loggers,
    instantiate,
    instantiate_group,
    output_dir,
    resolved_yaml,
    setup_run,
)
from safety_units.data.datamodule import build_datamodule
from safety_units.defenses.base import build_defense
from safety_units.utils.errors import ConfigError
from safety_units.training.freezing import build_masker
from safety_units.models.loading import LoadedModel, load_model
from safety_units.models.module import CausalLMModule
from safety_units.models.objectives import Objective, build_objective
from safety_units.units.layouts import unit_names, use_names
from safety_units.utils.ranks import RankedLogger
from safety_units.utils.run_logging import Stopwatch, run_params

log = RankedLogger(__name__)


def wrap_policy(class_names: list[str]) -> set[type]:
    """FSDP auto-wrap / activation-checkpointing policy from decoder-layer class names (e.g. LlamaDecoderLayer)."""
    import transformers

    out = set()
    for name in class_names:
        cls = None
        for mod_name in ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma", "phi3"):
            module = getattr(getattr(transformers.models, mod_name, None), f"modeling_{mod_name}", None)
            cls = getattr(module, name, None) if module is not None else None
            if cls is not None:
                break
        if cls is None:
            raise ConfigError(f"trainer.strategy: unknown decoder layer class {name!r} for the FSDP wrap policy.")
        out.add(cls)
    return out


def build_trainer(cfg: DictConfig, extra_callbacks: list, run_dir: Path):
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks") + extra_callbacks
    loggers = instantiate_group(cfg.get("logger"), "logger")
    return instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)


def run_train(cfg: DictConfig) -> dict:
    """Fit the configured model on the configured data; returns a summary dict (also used by tests)."""
    return fit(cfg)[0]


def fit(cfg: DictConfig, loaded: LoadedModel | None = None) -> tuple[dict, object]:
    """run_train's work, returning (summary, the trained model). `loaded` (a model already in memory, e.g. kept on
    the GPU between study stages) is trained in place instead of loading cfg.model."""
    setup_run(cfg)
    started_at = time.time()
    run_dir = output_dir(cfg)
    loaded = loaded or load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    use_names(model, unit_names(cfg))  # steering and LoRA's auto targets find the run's units.names too
    log.info("model %s: %.1fM parameters", loaded.name, sum(p.numel() for p in model.parameters()) / 1e6)

    defense = build_defense(cfg.get("defense"))  # the hooks of safety_units.defenses.base.Defense, in order
    objective = build_objective(cfg.get("objective"))
    extra_sources = defense.extra_sources(cfg.data)
    if extra_sources:  # e.g. SafeInstr's safety share joins the user's sources
        with open_dict(cfg.data.sources):
            cfg.data.sources.update(extra_sources)
    defense.check_run(cfg)
    datamodule = build_datamodule(cfg.data, tokenizer, cache_dir=cfg.paths.cache_dir)
    datamodule.prepare(model)

    masker, unit_map = build_masker(cfg, model, tokenizer) if cfg.get("freeze") is not None else (None, None)
    # With an adapter only the LoRA factors train; their own masker holds them at zero on frozen unit slices,
    # while `masker` (snapshot of the loaded weights) checks the merged weights at the end.
    adapter = instantiate(cfg.adapter, "adapter") if cfg.get("adapter") else None
    train_masker = masker
    if adapter is not None:
        model, train_masker = adapter.wrap(model, masker)
    loss = training_loss(defense, objective, cfg, tokenizer, getattr(datamodule, "kind", None))
    module = CausalLMModule(model, masker=train_masker, tokenizer=tokenizer, unit_map=unit_map,
                            objective=loss,
                            **OmegaConf.to_container(cfg.optim, resolve=True))

    unit_map_path = str(unit_map.path) if unit_map is not None else None
    finalize = FinalizeRun(str(run_dir), tokenizer, resolved_yaml(cfg), unit_map_path=unit_map_path,
                           export=bool(cfg.get("export", True)), masker=masker, adapter=adapter)
    params = run_params(cfg, unit_map, masker.describe() if masker is not None else None,
                        adapter.describe() if adapter is not None else None)
    images = {"plots/units_per_layer": str(Path(unit_map_path).parent / "units_per_layer.png")} if unit_map_path else {}
    # the defense's callbacks (SafeLoRA's and Antidote's edits of the weights) run before the export
    extra = [InterruptCheckpoint(str(run_dir / "checkpoints")), *defense.callbacks(tokenizer), finalize,
             RunSummary(str(run_dir), params, images, finalize, started_at)]
    trainer = build_trainer(cfg, extra, run_dir)
    try:  # a failed job of a multirun must not leave its wandb run open for the next job
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        summary = fit_summary(cfg, trainer, module, datamodule, finalize, masker, adapter, defense)
    finally:
        with Stopwatch():
            finish_loggers(trainer.loggers)
    return summary, module.model


def training_loss(defense, objective, cfg: DictConfig, tokenizer, kind: str | None):
    """What trains: the defense's loss where it brings one (only the plain LM loss gives way to it), else the
    objective, checked against the data's kind of rows (None: plain (prompt, response) rows)."""
    defense_loss = defense.training_objective(tokenizer, cfg.data, int(cfg.seed))
    if defense_loss is not None and type(objective) is not Objective:
        raise ConfigError(f"objective={objective.name} and defense={defense.name} both set the training loss; "
                          f"use one of them.")
    if objective.needs is not None and kind != objective.needs:
        raise ConfigError(f"objective={objective.name} trains on data={objective.needs} (rows with a role and "
                          f"reference log-probabilities), but data={cfg.data.get('name')} holds "
                          f"{kind or 'plain (prompt, response)'} rows.")
    if objective.needs is None and kind is not None:
        raise ConfigError(f"data={cfg.data.get('name')} holds {kind} rows, which objective={objective.name} does not "
                          f"train on; set the objective that does (conf/objective/: e.g. objective=dpo for "
                          f"data=preference).")
    return defense_loss if defense_loss is not None else objective


def fit_summary(cfg: DictConfig, trainer, module, datamodule, finalize, masker, adapter, defense) -> dict:
    """The fitted run's summary: steps, export, data, frozen entries, adapter, defense, evaluations, metrics."""
    run_dir = output_dir(cfg)
    summary = {"output_dir": str(run_dir), "global_step": trainer.global_step,
               "model_dir": str(run_dir / "model") if cfg.get("export", True) else None,
               "train_examples": len(datamodule.train_set), "data_stats": datamodule.stats}
    summary.update(finalize.summary)
    if masker is not None:
        summary["freeze"] = masker.describe()
    if adapter is not None:
        summary["adapter"] = adapter.describe()
    if (record := defense.summary()) is not None:
        summary["defense"] = record
    for cb in trainer.callbacks:
        if isinstance(cb, EvalCallback):
            summary["eval"] = cb.results
    if datamodule.val_set and "val/loss" not in trainer.callback_metrics and not trainer.interrupted:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # max_steps ended the run mid-epoch
    summary["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()
                          if getattr(v, "numel", lambda: 1)() == 1}
    return summary


def optimized_metric(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a hydra sweeper optimises (cfg.optimized_metric, set by hparams_search=...; None when unset).

    A metric the run did not log is an error, not a silent None that the sweeper would record as a result."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        hint = " (val/loss needs a validation split: data.val_fraction > 0)" if name.startswith("val/") else ""
        raise ConfigError(f"optimized_metric={name!r} was not logged by this run{hint}; the run logged: "
                          f"{', '.join(sorted(metrics)) or 'nothing'}.")
    return metrics[name]
