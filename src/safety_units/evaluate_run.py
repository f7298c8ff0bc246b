"""What `python evaluate.py` runs: load a model, optionally ablate (zero) units, run the eval suite, report."""

from __future__ import annotations

import json
import logging

import torch
from omegaconf import DictConfig

from safety_units.config import instantiate_group, output_dir, setup_run
from safety_units.errors import ConfigError
from safety_units.evaluation import (
    MODEL_FREE_TASKS,
    build_judge,
    judge_name,
    log_results,
    markdown_table,
    run_suite,
    training_prompts_of,
)
from safety_units.models import LoadedModel, load_model, resolve_device
from safety_units.training import finish_loggers
from safety_units.unit_map import save_selection
from safety_units.units import unit_names

log = logging.getLogger(__name__)


def ablate_units(model, selection: dict[str, torch.Tensor], names: dict | None = None) -> dict:
    """Zero every parameter slice of the selected units (rows of gate/up, columns of down/o_proj)."""
    from safety_units.units import resolve_units

    zeroed = {"units_zeroed": 0, "entries_zeroed": 0}
    with torch.no_grad():
        for g in resolve_units(model, names):
            sel = selection.get(g.key)
            if sel is None or not sel.any():
                continue
            idx = torch.nonzero(sel).flatten()
            zeroed["units_zeroed"] += len(idx)
            for s in g.slices:
                s.param.index_fill_(s.dim, idx.to(s.param.device), 0.0)
                zeroed["entries_zeroed"] += len(idx) * (s.param.numel() // s.param.shape[s.dim])
    return zeroed


TOPS = ("safety_minus_utility", "safety", "utility", "random")


def ablation_selection(cfg: DictConfig, model, names: dict | None):
    """The units to zero for cfg.ablate (None when no ablation is asked for), plus a description.

    One of: ablate.classes (whole classes), ablate.random_like (a random set as large as a class), or ablate.top
    with ablate.share (per unit kind, the round(share * units) units ranked highest by safety_minus_utility,
    safety or utility percentile rank -- UnitMap.top -- or, top=random, drawn at random with ablate.seed)."""
    from safety_units.unit_map import (
        UnitMap,
        random_units,
        selection_size,
        share_counts,
    )

    a = cfg.get("ablate")
    if a is None:
        return None, None
    classes = a.get("classes") or []
    classes = [classes] if isinstance(classes, str) else list(classes)
    top = a.get("top")
    asked = [k for k, v in (("classes", classes), ("random_like", a.get("random_like")), ("top", top)) if v]
    if a.get("share") is not None and not top:
        raise ConfigError("ablate.share needs ablate.top=safety_minus_utility|safety|utility|random.")
    if not a.get("unit_map"):
        if asked:
            raise ConfigError(f"ablate.{asked[0]} needs ablate.unit_map=<unit_map.safetensors>.")
        return None, None
    if len(asked) != 1:
        raise ConfigError("set exactly one of ablate.classes (e.g. [esu]), ablate.random_like (e.g. esu) and "
                          "ablate.top (with ablate.share).")
    um = UnitMap.load(a.unit_map, model=model, strict=a.get("strict_fingerprint", True), names=names)
    seed, match = int(a.get("seed", 0)), a.get("match", "kind")
    if classes:
        sel, what = um.select(classes), {"classes": classes}
    elif a.get("random_like"):
        sel = um.random_like(um.select(a.random_like), seed=seed, match=match)
        what = {"random_like": a.random_like, "seed": seed, "match": match}
    else:
        if top not in TOPS:
            raise ConfigError(f"ablate.top must be one of {TOPS}, got {top!r}.")
        counts = share_counts(um.sizes(), a.get("share"), "ablate.share")
        if top == "random":
            if match != "kind":
                raise ConfigError("ablate.top=random draws its share per unit kind; ablate.match=layer applies to "
                                  "ablate.random_like only.")
            sel = random_units(um.sizes(), counts, seed)
        else:
            sel = um.top(top, counts)
        what = {"top": top, "share": float(a.share), "seed": seed if top == "random" else None,
                "normalization": um.metadata.get("normalization", "per_layer")}
    what["units"] = selection_size(sel)
    what["unit_map"] = str(a.unit_map)
    return sel, what


def ablation_label(ablation: dict) -> str:
    if ablation.get("classes"):
        return f"classes {ablation['classes']}"
    if ablation.get("random_like"):
        return f"random like {ablation['random_like']} (seed {ablation['seed']})"
    if ablation["top"] == "random":
        return f"random {ablation['share']:.2%} of units (seed {ablation['seed']})"
    return f"top {ablation['share']:.2%} of units by {ablation['top']}"


def run_evaluate(cfg: DictConfig, loaded: LoadedModel | None = None, train_prompts: set[str] | None = None) -> dict:
    """Evaluate cfg.model (or `loaded`, a model already in memory, whose training prompts `train_prompts` are only
    counted) on cfg.eval; writes eval.json, eval.md, generations.jsonl and eval_meta.json into the output dir."""
    setup_run(cfg)
    out = output_dir(cfg)
    tasks = [t for t in (cfg.eval.get("tasks") or {}).values() if t is not None]
    judge = build_judge(cfg.judge)
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
    results = run_suite(model, tokenizer, cfg.eval, judge, train_prompts, out)
    meta = {"model": name, "model_path": cfg.model.get("path") if model is not None and not in_memory else None,
            "ablation": ablation, "judge": judge_name(judge)}
    (out / "eval_meta.json").write_text(json.dumps(meta, indent=2))
    table = markdown_table(results)
    (out / "eval.md").write_text(table + "\n")
    header = f"model {name}, judge {judge_name(judge)}" + (f", ablated {ablation_label(ablation)}" if ablation else "")
    print(f"\n{header}\n{table}\n", flush=True)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    log_results(loggers, results)
    finish_loggers(loggers)
    return {"results": results, "meta": meta, "output_dir": str(out)}
