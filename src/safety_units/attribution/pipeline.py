"""What `python attribute.py` runs: score every unit on safety and utility data, classify, write the unit map."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from safety_units.attribution.scorer import CALIBRATION_SETS, ScoringRun, build_scorer
from safety_units.data.calibration import calibration_batches, prompt_batches
from safety_units.models.loading import LoadedModel, load_model, resolve_device
from safety_units.units.classification import class_shares, classify_from_config
from safety_units.units.groups import resolve_units
from safety_units.units.layouts import unit_names, use_names
from safety_units.units.unit_map import UnitMap, full_fingerprint, save_selection
from safety_units.utils.config import compose_config, finish_loggers, instantiate_group, output_dir, setup_run
from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger, rank_zero_print
from safety_units.utils.run_logging import Stopwatch, log_images, log_params, run_params, set_summary

log = RankedLogger(__name__)


# The scorers as the validity harness runs them on channels (experiments.validity.plan): name -> attribute.yaml
# overrides. The planted-set ground truth (safety_units.experiments.synthetic.ground_truth) and benchmarks/scorers.py run these.
SCORER_RUNS = {
    "wifv": ["scoring=wifv"],
    "wifv_decision": ["scoring=wifv", "scoring.tokens=decision"],
    "activation_decision": ["scoring=activation", "scoring.tokens=decision"],
    "snip": ["scoring=snip"],
    "contrast": ["scoring=contrast"],
    "refusal_direction": ["scoring=refusal_direction"],
    "delta": ["scoring=delta"],
    "atp": ["scoring=atp"],
    "mask": ["scoring=mask"],
}
REFERENCE_METHODS = ("contrast", "delta")  # the scorers that compare against a base model (a ReferenceScorer)


def scoring_settings(scoring_cfg: DictConfig) -> dict:
    """The scorer's settings as the unit map and the attribution cache record them: `method` names the scorer, so
    its `_target_` (the class, code rather than a setting) is left out and keys stay those of maps made before."""
    settings = OmegaConf.to_container(scoring_cfg, resolve=True)
    settings.pop("_target_", None)
    return settings


def attribute(loaded: LoadedModel, cfg: DictConfig, device: str | None = None,
              state_dir: Path | None = None) -> UnitMap:
    """Score units on the safety and utility sets with the scorer cfg.scoring names (its `_target_`) and classify
    them; returns the (unsaved) UnitMap. `state_dir`: where a resumable scorer (mask) keeps its state."""
    model, tokenizer = loaded.model, loaded.tokenizer
    names = unit_names(cfg)
    groups = resolve_units(model, names)
    cal = cfg.calibration
    scorer = build_scorer(cfg.scoring)
    for which in scorer.calibration_sets:
        if cal.get(which) is None:
            raise ConfigError(f"scoring={scorer.method} needs calibration.{which}: {CALIBRATION_SETS[which]}.")
    reference = scorer.load_reference(loaded, cfg.model.get("dtype", "float32"), names) \
        if scorer.needs_reference else None
    model.to(resolve_device(device or cfg.get("device")))

    def load(which: str) -> list[dict]:
        n, length, size, seed = int(cal.nsamples), int(cal.max_length), int(cal.batch_size), int(cfg.seed)
        if which == "harmless":  # prompts only: where the model decides
            return prompt_batches(tokenizer, cal[which], n, length, size, seed, which)
        return calibration_batches(tokenizer, cal[which], n, length, size, seed, which, model=model,
                                   cache_dir=cfg.paths.cache_dir)

    run = ScoringRun(model, groups, names, load, state_dir=state_dir,
                     reference=reference.model if reference is not None else None,
                     ref_groups=resolve_units(reference.model, names) if reference is not None else None)
    scores, timings = {}, {}
    for which, score in (("safety", scorer.safety), ("utility", scorer.utility)):
        t0, loading = time.perf_counter(), run.loading_s
        scores[which] = score(run)
        timings[which] = round(time.perf_counter() - t0 - (run.loading_s - loading), 3)  # scoring, not batching
    classify_cfg = OmegaConf.to_container(cfg.classify, resolve=True)
    classes = classify_from_config(scores["safety"], scores["utility"], classify_cfg)
    shares = class_shares(classes)
    log.info("classify=%s: class shares %s", classify_cfg.get("method", "shares"),
             "; ".join(f"{kind} " + " ".join(f"{c.upper()} {100 * v:.1f}%" for c, v in sh.items())
                       for kind, sh in shares.items()))
    meta = {
        "fingerprint": full_fingerprint(model, names),
        "model_name": loaded.name,
        "scoring": scoring_settings(cfg.scoring),
        "normalization": cfg.classify.normalization,
        "classify": classify_cfg,
        "class_shares": shares,
        "calibration": {w: {"path": str(cal[w].path), "nsamples": int(cal.nsamples), "max_length": int(cal.max_length)}
                        for w in scorer.calibration_sets},
        "seconds": timings,
        "unit_names": names,
        "unit_kinds": sorted({g.kind for g in groups}),  # "attn" (output channels) or "head" beside "mlp"
    } | run.metadata
    return UnitMap(scores["safety"], scores["utility"], classes, meta)


def run_attribution(cfg: DictConfig) -> dict:
    """What `python attribute.py` runs: attribute cfg.model, write the unit map; with logger=..., the run's params
    (the unit map's fingerprint and class shares among them), a summary and units_per_layer.png are logged."""
    setup_run(cfg)
    t0 = time.perf_counter()
    out = output_dir(cfg)
    loaded = load_model(cfg.model)
    use_names(loaded.model, unit_names(cfg))
    um = attribute(loaded, cfg, state_dir=out)
    path = um.save(out)
    if um.metadata.get("mask"):  # the mask the optimiser reached (removal >= 0.5, r >= 0): evaluate.py can zero it
        save_selection({k: v >= 0 for k, v in um.safety.items()}, out / "mask_units.safetensors",
                       {"role": "mask", "units": um.metadata["mask"]["mask_units"]})
    summary = um.summary()
    _print_summary(summary, path)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    try:
        with Stopwatch():
            log_params(loggers, run_params(cfg, unit_map=um), out)
            shares = {f"units/{kind}/{c}": s["share"] for kind, t in summary["total"].items() for c, s in t.items()
                      if isinstance(s, dict)}
            seconds = {f"time/{k}_s": v for k, v in (um.metadata.get("seconds") or {}).items()
                       if isinstance(v, (int, float))}
            set_summary(loggers, shares | seconds | {"time/wall_s": round(time.perf_counter() - t0, 3)}, out)
            log_images(loggers, {"plots/units_per_layer": out / "units_per_layer.png"})
    finally:
        with Stopwatch():
            finish_loggers(loggers)
    return {"unit_map": str(path), "summary": summary}


def _print_summary(summary: dict, path: Path) -> None:
    lines = [f"unit map written to {path}", "", "| kind | units | ESU | EUU | CU | RU |", "|---|---:|---:|---:|---:|---:|"]
    for kind, t in summary["total"].items():
        cells = " | ".join(f"{t[c]['count']} ({100 * t[c]['share']:.1f}%)" for c in ("esu", "euu", "cu", "ru"))
        lines.append(f"| {kind} | {t['units']} | {cells} |")
    rank_zero_print("\n".join(lines), flush=True)


def attribution_config(overrides: list[str] | None = None) -> DictConfig:
    """The attribute.yaml config composed inside a running Hydra app or on its own."""
    return compose_config("attribute", overrides)


def cached_attribution(train_cfg: DictConfig, model, tokenizer) -> Path:
    """Attribute the model being trained (freeze.auto_attribute): computed once per model fingerprint and
    attribution settings, cached under cache_dir/unit_maps."""
    overrides = list(train_cfg.freeze.get("attribute_overrides", []) or [])
    acfg = attribution_config(overrides)
    with open_dict(acfg):
        acfg.paths = train_cfg.paths
        acfg.units = train_cfg.get("units", acfg.units)
    fp = full_fingerprint(model, unit_names(acfg))
    settings = {k: OmegaConf.to_container(acfg[k], resolve=True) for k in ("classify", "calibration")}
    settings["scoring"] = scoring_settings(acfg.scoring)
    key = hashlib.sha256(json.dumps({"fp": fp, "settings": settings}, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(train_cfg.paths.cache_dir) / "unit_maps" / key
    path = out / "unit_map.safetensors"
    if path.is_file():
        log.info("freeze.auto_attribute: using the cached unit map %s", path)
        return path
    log.info("freeze.auto_attribute: no unit map given; attributing this model once (cached in %s)", out)
    device = next(model.parameters()).device
    um = attribute(LoadedModel(model, tokenizer, "auto"), acfg)
    model.to(device)
    # Written to a private dir and renamed: under trainer=ddp every rank runs this, and a reader never sees half a
    # map (the maps are identical: same model, same settings).
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    um.save(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first: keep its map
        shutil.rmtree(tmp, ignore_errors=True)
    _print_summary(um.summary(), path)
    return path
