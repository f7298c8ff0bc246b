"""SCANS against refusal-direction ablation and no steering, on aligned models: results/scans.md.

    python scripts/run_scans.py --model aligned=logs/align_quick/model \\
        --model quickstart_ru=logs/quickstart_ru/model --model quickstart_random=logs/quickstart_random/model \\
        --model defense_sft=logs/defenses_smollm2/align_sft/model \\
        --unit-map defense_sft:wifv=logs/defenses_smollm2/attribute_aligned/unit_map.safetensors \\
        --unit-map defense_sft:mask=logs/defenses_smollm2/attribute_mask/unit_map.safetensors --resume
    python scripts/run_scans.py --report-only          # rebuild results/scans.md from results/scans/cells.json

The first model is the fully aligned one: it runs no steering, refusal_ablation and SCANS at every --alphas value;
the goal and the recommended alpha are read there (safety_units.experiments.scans_report, criteria fixed before the runs). The
others run no steering, refusal_ablation and SCANS at the recommended alpha (or, when none meets the goal, the
fallback alpha). Every condition is `evaluate.py eval=scans steer=...` on the model loaded once; each writes
<work dir>/<model>/<condition>/ (eval.json, generations.jsonl, eval_meta.json) and is skipped with --resume when
its settings are unchanged. sigma(q)'s held-out accuracy is measured on the suite's own prompts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.utils.errors import ConfigError, friendly_errors  # noqa: E402

DEFAULT_ALPHAS = "4,8,16,32"


def pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r}: expected NAME=PATH")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def provenance(path: str) -> str:
    """How the model was aligned, from the config exported with it."""
    from omegaconf import OmegaConf

    p = Path(path) / "safety_units_config.yaml"
    if not p.is_file():
        return "unknown (no safety_units_config.yaml)"
    c = OmegaConf.load(p)
    return (f"data={c.data.get('name')} n={c.data.get('num_samples')}, freeze={c.freeze.get('strategy')}, "
            f"lr={c.optim.get('lr')}, epochs={c.trainer.get('max_epochs')}, seed={c.get('seed')}")


def run_condition(loaded, path: str, key: str, overrides: list[str], work: Path, resume: bool) -> dict:
    from safety_units.utils.config import compose_config
    from safety_units.evaluation.run import run_evaluate
    from safety_units.evaluation.suite import training_prompts_of

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
    from safety_units.utils.config import compose_config
    from safety_units.experiments.scans_report import classifier_metrics
    from safety_units.steering.scans import fitted, sigma_scores, sigma_setup

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


@friendly_errors
def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                    help="an aligned model (exported run dir/model); the first is the fully aligned one")
    ap.add_argument("--unit-map", action="append", default=[], metavar="MODEL:LABEL=PATH",
                    help="a unit map of that model: the anchored blocks' overlap with its ESU")
    ap.add_argument("--alphas", default=DEFAULT_ALPHAS, help="SCANS multipliers for the first model")
    ap.add_argument("--ablation-on", choices=["all", "first"], default="all",
                    help="refusal_ablation on every model (default) or on the first only (it is the slow condition)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "logs" / "scans")
    ap.add_argument("--resume", action="store_true", help="skip conditions whose settings are unchanged")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="an evaluate.py override for every condition (e.g. eval.tasks.harmful.limit=20); steer.* "
                         "ones go to the steered conditions")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "results")
    ap.add_argument("--report-name", default="scans")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    from safety_units.experiments.scans_report import fallback_alpha, goal_check, layer_overlap, recommend, write_report

    if args.report_only:
        print(f"wrote {write_report(args.results_dir, args.report_name)}")
        return
    models = pairs(args.model, "--model")
    if not models:
        raise ConfigError("give at least one --model NAME=PATH (the first: the fully aligned model)")
    maps: dict[str, dict[str, str]] = {}
    for item in args.unit_map:
        head, path = item.split("=", 1) if "=" in item else (item, "")
        if ":" not in head or not path:
            raise ConfigError(f"--unit-map {item!r}: expected MODEL:LABEL=PATH")
        m, label = head.split(":", 1)
        if m not in models:
            raise ConfigError(f"--unit-map {item!r}: no --model named {m!r}")
        maps.setdefault(m, {})[label] = path
    alphas = [float(a) for a in args.alphas.split(",")]
    steer_extra = [e for e in args.extra if e.startswith("steer.")]
    cells = {"models": {}, "judge": None}
    chosen = None
    import torch

    from safety_units.models.loading import load_hf
    from safety_units.units.unit_map import UnitMap

    for i, (name, path) in enumerate(models.items()):
        loaded = load_hf(path)
        loaded.model.to("cuda" if torch.cuda.is_available() else "cpu")
        work = args.work_dir / name
        grid = alphas if i == 0 else [chosen]
        conds = {"none": ("none", None, ["steer=none"])}
        if i == 0 or args.ablation_on == "all":
            conds["refusal_ablation"] = ("refusal_ablation", None, ["steer=refusal_ablation"])
        for a in grid:
            conds[f"scans_a{a:g}"] = ("scans", a, ["steer=scans", f"steer.alpha={a}"])
        model = {"path": path, "provenance": provenance(path), "conditions": {}}
        for key, (method, a, over) in conds.items():
            extra = [e for e in args.extra if method != "none" or not e.startswith("steer.")]
            rec = run_condition(loaded, path, key, [*over, *extra], work, args.resume)
            results = json.loads((work / key / "eval.json").read_text())
            label = "no steering" if method == "none" else method if a is None else f"SCANS alpha={a:g}"
            model["conditions"][key] = {"method": method, "alpha": a, "label": label, "seconds": rec["seconds"],
                                        "results": results, "steer": rec["steer"]}
            cells["judge"] = results["harmful"]["extra"]["judge"]
        model["ablation"] = model["conditions"].get("refusal_ablation", {}).get("steer")
        model["sigma"] = sigma_heldout(loaded, work / "none", steer_extra)
        model["overlap"] = {}
        for label, map_path in maps.get(name, {}).items():
            counts = UnitMap.load(map_path).counts()
            model["overlap"][label] = layer_overlap(model["sigma"]["layers"], counts, "esu")
        cells["models"][name] = model
        if i == 0:
            base = model["conditions"]["none"]["results"]
            checks = {c["alpha"]: goal_check(base, c["results"]) for c in model["conditions"].values()
                      if c["method"] == "scans"}
            chosen = recommend(checks)
            chosen = fallback_alpha(checks) if chosen is None else chosen
            print(f"alpha for the other models: {chosen:g}", flush=True)
        del loaded
    out = args.results_dir / args.report_name
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells.json").write_text(json.dumps(cells, indent=1))
    print(f"wrote {write_report(args.results_dir, args.report_name)}")


if __name__ == "__main__":
    main()
