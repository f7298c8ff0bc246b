"""What `python evaluate.py` runs: load a model, optionally ablate units, run the eval suite, report."""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from safety_units.config import instantiate_group, output_dir, setup_run
from safety_units.errors import ConfigError
from safety_units.evaluation import (ablate_units, build_judge, log_results, markdown_table, run_suite,
                                     training_prompts_of)
from safety_units.models import load_model, resolve_device
from safety_units.training import finish_loggers
from safety_units.units import unit_names

log = logging.getLogger(__name__)


def ablation_selection(cfg: DictConfig, model, names: dict | None):
    """The units to zero for cfg.ablate (None when no ablation is asked for), plus a description."""
    from safety_units.unit_map import UnitMap, selection_size

    a = cfg.get("ablate")
    if a is None or not a.get("unit_map"):
        if a is not None and (a.get("classes") or a.get("random_like")):
            raise ConfigError("ablate.classes / ablate.random_like need ablate.unit_map=<unit_map.safetensors>.")
        return None, None
    classes = a.get("classes") or []
    classes = [classes] if isinstance(classes, str) else list(classes)
    if bool(classes) == bool(a.get("random_like")):
        raise ConfigError("set exactly one of ablate.classes (e.g. [esu]) and ablate.random_like (e.g. esu).")
    um = UnitMap.load(a.unit_map, model=model, strict=a.get("strict_fingerprint", True), names=names)
    if classes:
        sel, what = um.select(classes), {"classes": classes}
    else:
        sel = um.random_like(um.select(a.random_like), seed=int(a.get("seed", 0)), match=a.get("match", "kind"))
        what = {"random_like": a.random_like, "seed": int(a.get("seed", 0)), "match": a.get("match", "kind")}
    what["units"] = selection_size(sel)
    what["unit_map"] = str(a.unit_map)
    return sel, what


def run_evaluate(cfg: DictConfig) -> dict:
    setup_run(cfg)
    out = output_dir(cfg)
    loaded = load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.to(resolve_device(cfg.get("device")))
    names = unit_names(cfg)
    selection, ablation = ablation_selection(cfg, model, names)
    if selection is not None:
        zeroed = ablate_units(model, selection, names)
        ablation.update(zeroed)
        log.info("ablation: zeroed %d units (%s parameter entries): %s", zeroed["units_zeroed"],
                 f"{zeroed['entries_zeroed']:,}", ablation)
    exclude = training_prompts_of(cfg.model.get("path"))
    results = run_suite(model, tokenizer, cfg.eval, build_judge(cfg.judge), exclude, out)
    meta = {"model": loaded.name, "model_path": cfg.model.get("path"), "ablation": ablation}
    (out / "eval_meta.json").write_text(json.dumps(meta, indent=2))
    table = markdown_table(results)
    (out / "eval.md").write_text(table + "\n")
    header = f"model {loaded.name}" + (f", ablated {ablation.get('classes') or 'random like ' + str(ablation.get('random_like'))}"
                                       if ablation else "")
    print(f"\n{header}\n{table}\n", flush=True)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    log_results(loggers, results)
    finish_loggers(loggers)
    return {"results": results, "meta": meta, "output_dir": str(out)}
