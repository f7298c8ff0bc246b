"""What `python evaluate.py` runs: load a model, optionally ablate (zero) units, run the eval suite, report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from omegaconf import DictConfig

from safety_units.utils.config import finish_loggers, instantiate_group, output_dir, setup_run
from safety_units.utils.errors import ConfigError
from safety_units.evaluation.suite import MODEL_FREE_TASKS, build_judge, log_results, run_suite, training_prompts_of
from safety_units.units.masking import ablate_units
from safety_units.models.loading import LoadedModel, load_model, resolve_device
from safety_units.utils.ranks import RankedLogger, rank_zero_print
from safety_units.utils.run_logging import Stopwatch, flat, log_params, run_params, set_summary
from safety_units.evaluation.run_tables import eval_summary, log_completions, read_generations
from safety_units.attribution.selection import ablation_label, ablation_selection
from safety_units.steering.steerer import build_steerer, steering
from safety_units.evaluation.task_results import judge_name, markdown_table
from safety_units.units.unit_map import save_selection
from safety_units.units.layouts import unit_names, use_names

log = RankedLogger(__name__)


def run_evaluate(cfg: DictConfig, loaded: LoadedModel | None = None, train_prompts: set[str] | None = None) -> dict:
    """Evaluate cfg.model (or `loaded`, a model already in memory, whose training prompts `train_prompts` are only
    counted) on cfg.eval; writes eval.json, eval.md, generations.jsonl and eval_meta.json into the output dir."""
    setup_run(cfg)
    t0 = time.perf_counter()
    out = output_dir(cfg)
    tasks = [t for t in (cfg.eval.get("tasks") or {}).values() if t is not None]
    judge = build_judge(cfg.judge)
    steerer = build_steerer(cfg.get("steer"))  # a bad steer= config fails here, before a model loads
    in_memory = loaded is not None
    if tasks and all(t.get("type") in MODEL_FREE_TASKS for t in tasks):
        # Re-judging saved completions needs no model: none is loaded (model= settings are ignored).
        if cfg.get("ablate") is not None and cfg.ablate.get("unit_map"):
            raise ConfigError("ablate.unit_map needs a model, but eval=rejudge only judges saved completions.")
        model = tokenizer = None
        name, ablation, train_prompts = "none (saved completions)", None, None
    else:
        loaded = loaded or load_model(cfg.model)
        model, tokenizer, name = loaded.model, loaded.tokenizer, loaded.name
        model.to(resolve_device(cfg.get("device")))
        names = unit_names(cfg)
        use_names(model, names)  # steering finds the blocks of the run's units.names too
        selection, ablation = ablation_selection(cfg, model, names)
        if selection is not None:
            zeroed = ablate_units(model, selection, names)
            ablation.update(zeroed)
            save_selection(selection, out / "ablated_units.safetensors", ablation)
            log.info("ablation: zeroed %d units (%s parameter entries): %s", zeroed["units_zeroed"],
                     f"{zeroed['entries_zeroed']:,}", ablation)
        # The model's own training prompts are only counted (extra.train_overlap): every model sees the same prompts.
        if not in_memory:
            train_prompts = training_prompts_of(cfg.model.get("path"))
    with steering(model, tokenizer, steerer) as steer:  # after any ablation: fitted on the ablated model
        results = run_suite(model, tokenizer, cfg.eval, judge, train_prompts, out)
    params = run_params(cfg) | {"eval.model_name": name, "eval.judge": judge_name(judge)} | \
        {f"ablation.{k}": v for k, v in flat(ablation or {}).items()}
    meta = {"model": name, "model_path": cfg.model.get("path") if model is not None and not in_memory else None,
            "ablation": ablation, "steer": steer, "judge": judge_name(judge), "params": params}
    (out / "eval_meta.json").write_text(json.dumps(meta, indent=2, default=str))
    table = markdown_table(results)
    (out / "eval.md").write_text(table + "\n")
    header = f"model {name}, judge {judge_name(judge)}" + (f", ablated {ablation_label(ablation)}" if ablation else "") \
        + (f", steered by {steer['method']}" if steerer.active else "")
    rank_zero_print(f"\n{header}\n{table}\n", flush=True)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    try:
        with Stopwatch():
            log_params(loggers, params, out)
            log_results(loggers, results)
            done = {k: asdict(v) for k, v in results.items()}
            log_completions(loggers, {"eval": read_generations(out / "generations.jsonl")},
                            int(cfg.eval.get("log_completions") or 0), int(cfg.eval.get("seed", 0)))
            set_summary(loggers, eval_summary(done) | {"time/wall_s": round(time.perf_counter() - t0, 3)}, out)
    finally:
        with Stopwatch():
            finish_loggers(loggers)
    return {"results": results, "meta": meta, "output_dir": str(out)}
