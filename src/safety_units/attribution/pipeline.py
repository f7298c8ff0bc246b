"""What `python attribute.py` runs: score every unit on safety and utility data, classify, write the unit map."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from safety_units.units.classification import class_shares, classify_from_config
from safety_units.utils.config import compose_config, finish_loggers, instantiate_group, output_dir, setup_run
from safety_units.attribution.contrast import contrast_scores, load_reference
from safety_units.attribution.delta import delta_scores
from safety_units.attribution.atp import atp_scores
from safety_units.data.calibration import calibration_batches, prompt_batches
from safety_units.utils.errors import ConfigError
from safety_units.attribution.mask import DEFAULTS, mask_scores
from safety_units.models.loading import LoadedModel, load_model, resolve_device
from safety_units.utils.ranks import RankedLogger, rank_zero_print
from safety_units.attribution.refusal_direction import refusal_direction_scores
from safety_units.utils.run_logging import Stopwatch, log_images, log_params, run_params, set_summary
from safety_units.attribution.scoring import METHODS, check_tokens, score_units
from safety_units.units.unit_map import UnitMap, full_fingerprint, save_selection
from safety_units.units.groups import decoder_layers, resolve_units, unit_names

log = RankedLogger(__name__)


# The scorers as the validity harness runs them on channels (scripts/run_attribution_validity.sh): name -> attribute.yaml
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
REFERENCE_METHODS = ("contrast", "delta")  # the scorers that compare against a base model (scoring.reference)

def attribute(loaded: LoadedModel, cfg: DictConfig, device: str | None = None,
              state_dir: Path | None = None) -> UnitMap:
    """Score units on the safety and utility sets and classify them; returns the (unsaved) UnitMap. `state_dir`:
    where a resumable scorer (mask) keeps its state."""
    model, tokenizer = loaded.model, loaded.tokenizer
    names = unit_names(cfg)
    groups = resolve_units(model, names)
    cal, sc = cfg.calibration, cfg.scoring
    method, tokens, k = sc.method, sc.get("tokens", "all"), sc.get("decision_tokens", 4)
    if method not in METHODS:
        raise ConfigError(f"scoring.method must be one of {METHODS}, got {method!r}.")
    check_tokens(tokens, k)
    mask_utility = sc.get("utility", "activation") if method == "mask" else None
    if mask_utility not in (None, "activation", "none"):
        raise ConfigError(f"scoring.utility must be activation or none, got {mask_utility!r}.")
    if method in ("refusal_direction", "atp") and cal.get("harmless") is None:
        raise ConfigError(f"scoring={method} needs calibration.harmless: a prompt set of harmless "
                          f"instructions (a data source, response: null).")
    reference = load_reference(sc, cfg.model.get("dtype", "float32"), loaded, names) \
        if method in REFERENCE_METHODS else None
    ref_groups = resolve_units(reference.model, names) if reference is not None else None
    dev = resolve_device(device or cfg.get("device"))
    model.to(dev)
    scores, timings, extra = {}, {}, {}
    if method == "mask":  # the gates train against both sets at once: utility's batches are needed first
        which_order = ("utility", "safety")
    else:
        which_order = ("safety", "utility")
    batches_of: dict[str, list] = {}
    for which in which_order:
        if method == "delta" and which == "safety":  # the weights alone: no calibration batch, no forward pass
            t0 = time.perf_counter()
            scores[which] = delta_scores(groups, ref_groups)
            timings[which] = round(time.perf_counter() - t0, 3)
            continue
        batches = calibration_batches(tokenizer, cal[which], int(cal.nsamples), int(cal.max_length),
                                      int(cal.batch_size), int(cfg.seed), which, model=model,
                                      cache_dir=cfg.paths.cache_dir)
        batches_of[which] = batches
        harmless = prompt_batches(tokenizer, cal.harmless, int(cal.nsamples), int(cal.max_length),
                                  int(cal.batch_size), int(cfg.seed), "harmless") \
            if which == "safety" and method in ("refusal_direction", "atp") else None
        desc = f"{method} on {which}"
        t0 = time.perf_counter()
        if method == "mask" and which == "safety":
            settings = {k: sc.get(k) for k in DEFAULTS}
            scores[which], extra["mask"] = mask_scores(
                model, groups, batches, batches_of["utility"], k, settings, desc=desc,
                state_path=state_dir / "mask_state.pt" if state_dir else None,
                checkpoint_every=int(sc.get("checkpoint_every", 25) or 0))
        elif method == "contrast":
            scores[which] = contrast_scores(model, reference.model, groups, ref_groups, batches, tokens, k, desc=desc)
        elif method == "refusal_direction" and which == "safety":
            scores[which], extra["refusal_direction_norms"] = refusal_direction_scores(
                model, decoder_layers(model, names), groups, batches, harmless)
        elif method == "atp" and which == "safety":
            scores[which] = atp_scores(model, groups, batches, harmless, k, sc.get("metric", "refusal_logprob"),
                                       desc=desc)
        elif mask_utility == "none":  # rank by the removal logit alone
            scores[which] = {g.key: torch.zeros(g.n) for g in groups}
        elif method in ("refusal_direction", "delta", "atp", "mask"):  # utility: how much a unit writes on benign data
            scores[which] = score_units(model, groups, batches, "activation", tokens=tokens, decision_tokens=k,
                                        desc=desc)
        else:
            scores[which] = score_units(model, groups, batches, method, tokens=tokens, decision_tokens=k,
                                        gradient_checkpointing=sc.get("gradient_checkpointing", True), desc=desc)
        timings[which] = round(time.perf_counter() - t0, 3)
    classify_cfg = OmegaConf.to_container(cfg.classify, resolve=True)
    classes = classify_from_config(scores["safety"], scores["utility"], classify_cfg)
    shares = class_shares(classes)
    log.info("classify=%s: class shares %s", classify_cfg.get("method", "shares"),
             "; ".join(f"{kind} " + " ".join(f"{c.upper()} {100 * v:.1f}%" for c, v in sh.items())
                       for kind, sh in shares.items()))
    used = ("safety", "utility", "harmless") if method in ("refusal_direction", "atp") else ("safety", "utility")
    meta = {
        "fingerprint": full_fingerprint(model, names),
        "model_name": loaded.name,
        "scoring": OmegaConf.to_container(sc, resolve=True),
        "normalization": cfg.classify.normalization,
        "classify": classify_cfg,
        "class_shares": shares,
        "calibration": {w: {"path": str(cal[w].path), "nsamples": int(cal.nsamples), "max_length": int(cal.max_length)}
                        for w in used},
        "seconds": timings,
        "unit_names": names,
        "unit_kinds": sorted({g.kind for g in groups}),  # "attn" (output channels) or "head" beside "mlp"
    } | extra
    return UnitMap(scores["safety"], scores["utility"], classes, meta)


def run_attribution(cfg: DictConfig) -> dict:
    """What `python attribute.py` runs: attribute cfg.model, write the unit map; with logger=..., the run's params
    (the unit map's fingerprint and class shares among them), a summary and units_per_layer.png are logged."""
    setup_run(cfg)
    t0 = time.perf_counter()
    out = output_dir(cfg)
    loaded = load_model(cfg.model)
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
    settings = {k: OmegaConf.to_container(acfg[k], resolve=True) for k in ("scoring", "classify", "calibration")}
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
