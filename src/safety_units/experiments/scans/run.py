"""The runs behind results/scans.md: SCANS against refusal-direction ablation and no steering, on aligned models
(scripts/run_scans.py is the command line; safety_units.experiments.scans.report writes the report).

The first model is the fully aligned one: it runs no steering, refusal_ablation and SCANS at every alpha; the goal
and the recommended alpha are read there (criteria fixed before the runs in scans.report). The others run no
steering, refusal_ablation (unless `ablation_on="first"`: it is the slow condition) and SCANS at the recommended
alpha (or, when none meets the goal, the fallback alpha). Every condition is `evaluate.py eval=scans steer=...` on
the model loaded once; each writes <work dir>/<model>/<condition>/ (eval.json, generations.jsonl, eval_meta.json)
and its condition.json, and is skipped with `resume` when its settings are unchanged. sigma(q)'s held-out accuracy
is measured on the suite's own prompts; a model's unit maps give the anchored blocks' overlap with their ESU.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from safety_units.evaluation.run import run_evaluate
from safety_units.evaluation.suite import training_prompts_of
from safety_units.experiments.scans.report import (classifier_metrics, fallback_alpha, goal_check, layer_overlap,
                                                   recommend, write_report)
from safety_units.models.loading import load_hf
from safety_units.steering.scans import sigma_scores, sigma_setup
from safety_units.steering.steerer import fitted
from safety_units.units.unit_map import UnitMap
from safety_units.utils.config import compose_config
from safety_units.utils.errors import ConfigError


def name_paths(items: list[str], what: str) -> dict[str, str]:
    """NAME=PATH items of a command line (`what` names the option in errors)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r}: expected NAME=PATH")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def unit_maps(items: list[str], models: dict[str, str]) -> dict[str, dict[str, str]]:
    """MODEL:LABEL=PATH items -> {model: {label: path}}; each model must be one of `models`."""
    maps: dict[str, dict[str, str]] = {}
    for item in items:
        head, path = item.split("=", 1) if "=" in item else (item, "")
        if ":" not in head or not path:
            raise ConfigError(f"--unit-map {item!r}: expected MODEL:LABEL=PATH")
        m, label = head.split(":", 1)
        if m not in models:
            raise ConfigError(f"--unit-map {item!r}: no --model named {m!r}")
        maps.setdefault(m, {})[label] = path
    return maps


def provenance(path: str) -> str:
    """How the model was aligned, from the config exported with it."""
    p = Path(path) / "safety_units_config.yaml"
    if not p.is_file():
        return "unknown (no safety_units_config.yaml)"
    c = OmegaConf.load(p)
    return (f"data={c.data.get('name')} n={c.data.get('num_samples')}, freeze={c.freeze.get('strategy')}, "
            f"lr={c.optim.get('lr')}, epochs={c.trainer.get('max_epochs')}, seed={c.get('seed')}")


def run_condition(loaded, path: str, key: str, overrides: list[str], work: Path, resume: bool) -> dict:
    """One condition's evaluate.py run into <work>/<key>/ (skipped with `resume` when its settings are unchanged)."""
    out = work / key
    over = ["model=hf", f"model.path={path}", "eval=scans", *overrides]
    digest = hashlib.sha256(json.dumps(over).encode()).hexdigest()[:16]
    stamp = out / "condition.json"
    if resume and stamp.is_file() and json.loads(stamp.read_text())["hash"] == digest:
        print(f"[skip] {work.name}/{key}: finished, settings unchanged", flush=True)
        return json.loads(stamp.read_text())
    cfg = compose_config("evaluate", [*over, f"paths.output_dir={out}"])
    t0 = time.perf_counter()
    run = run_evaluate(cfg, loaded=loaded, train_prompts=training_prompts_of(path))
    record = {"hash": digest, "overrides": over, "seconds": round(time.perf_counter() - t0, 1),
              "steer": run["meta"]["steer"]}
    stamp.write_text(json.dumps(record, indent=2))
    print(f"[done] {work.name}/{key} in {record['seconds']} s", flush=True)
    return record


def sigma_heldout(loaded, none_dir: Path, steer_overrides: list[str]) -> dict:
    """sigma(q) and the unsteered model's refusal as harmful/harmless classifiers of the suite's prompts."""
    cfg = compose_config("evaluate", ["steer=scans", *steer_overrides]).steer
    art = fitted(loaded.model, loaded.tokenizer, cfg)
    setup = sigma_setup(art, cfg)
    rows = [json.loads(line) for line in (none_dir / "generations.jsonl").read_text().splitlines()]
    by = {t: [r for r in rows if r["task"] == t] for t in ("harmful", "oktest", "harmless")}
    scores = {t: sigma_scores(loaded.model, loaded.tokenizer, art, setup, [r["prompt"] for r in rs], cfg).tolist()
              for t, rs in by.items()}
    out = {"sigma": {}, "refusal": {}}
    for neg in ("oktest", "harmless"):
        labels = [1] * len(by["harmful"]) + [0] * len(by[neg])
        out["sigma"][neg] = classifier_metrics(scores["harmful"] + scores[neg], labels, setup["threshold"])
        refused = [float(r["refusal"]) for r in by["harmful"] + by[neg]]
        out["refusal"][neg] = classifier_metrics(refused, labels, 0.5)
    return {**setup, "heldout": out, "vocab_scores": [round(float(s), 4) for s in art["vocab_scores"]],
            "norms": [round(float(s), 3) for s in art["norms"]], "scores": scores}


def conditions(first: bool, ablation_on: str, alphas: list[float]) -> dict[str, tuple]:
    """A model's conditions: key -> (method, alpha, steer overrides)."""
    conds = {"none": ("none", None, ["steer=none"])}
    if first or ablation_on == "all":
        conds["refusal_ablation"] = ("refusal_ablation", None, ["steer=refusal_ablation"])
    for a in alphas:
        conds[f"scans_a{a:g}"] = ("scans", a, ["steer=scans", f"steer.alpha={a}"])
    return conds


def run_model(name: str, path: str, maps: dict[str, str], conds: dict[str, tuple], work: Path, extra: list[str],
              resume: bool) -> dict:
    """Every condition of one model (loaded once), sigma(q) held out, and the overlap with its maps' ESU."""
    loaded = load_hf(path)
    loaded.model.to("cuda" if torch.cuda.is_available() else "cpu")
    model = {"path": path, "provenance": provenance(path), "conditions": {}}
    for key, (method, a, over) in conds.items():
        own = [e for e in extra if method != "none" or not e.startswith("steer.")]
        rec = run_condition(loaded, path, key, [*over, *own], work, resume)
        results = json.loads((work / key / "eval.json").read_text())
        label = "no steering" if method == "none" else method if a is None else f"SCANS alpha={a:g}"
        model["conditions"][key] = {"method": method, "alpha": a, "label": label, "seconds": rec["seconds"],
                                    "results": results, "steer": rec["steer"]}
    model["ablation"] = model["conditions"].get("refusal_ablation", {}).get("steer")
    model["sigma"] = sigma_heldout(loaded, work / "none", [e for e in extra if e.startswith("steer.")])
    model["overlap"] = {label: layer_overlap(model["sigma"]["layers"], UnitMap.load(p).counts(), "esu")
                        for label, p in maps.items()}
    return model


def run_scans(models: dict[str, str], maps: dict[str, dict[str, str]], alphas: list[float], ablation_on: str,
              work_dir: Path, resume: bool, extra: list[str], results_dir: Path, report_name: str) -> Path:
    """Run every model's conditions (the first's alpha grid picks the others' alpha), write
    <results_dir>/<report_name>/cells.json and the report; returns the report's path. `extra`: evaluate.py
    overrides for every condition (steer.* ones only for the steered conditions)."""
    if not models:
        raise ConfigError("give at least one --model NAME=PATH (the first: the fully aligned model)")
    cells = {"models": {}, "judge": None}
    chosen = None
    for i, (name, path) in enumerate(models.items()):
        conds = conditions(i == 0, ablation_on, alphas if i == 0 else [chosen])
        model = run_model(name, path, maps.get(name, {}), conds, work_dir / name, extra, resume)
        cells["judge"] = next(reversed(model["conditions"].values()))["results"]["harmful"]["extra"]["judge"]
        cells["models"][name] = model
        if i == 0:
            base = model["conditions"]["none"]["results"]
            checks = {c["alpha"]: goal_check(base, c["results"]) for c in model["conditions"].values()
                      if c["method"] == "scans"}
            chosen = recommend(checks)
            chosen = fallback_alpha(checks) if chosen is None else chosen
            print(f"alpha for the other models: {chosen:g}", flush=True)
    out = results_dir / report_name
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells.json").write_text(json.dumps(cells, indent=1))
    return write_report(results_dir, report_name)
