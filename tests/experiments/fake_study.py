"""A synthetic SSAH study v2 dir for the verdict and report tests -- eval.json, eval_meta.json, point.json,
study.json as safety_units.experiments.study.runner writes them, no model runs -- in which, by default, every claim
holds; `values` changes the numbers of any stage."""

import dataclasses
import json
import math

from conftest import ROOT

from safety_units.experiments.study.plan import SCALES, plan
from safety_units.experiments.study.verdicts import load_study, verdicts

N = 40  # prompts per task
SCALE = dataclasses.replace(SCALES["cpu"], seeds=[0, 1], random_seeds=[0, 1], mix_shares=[0.1], aoa_epochs=[1, 5],
                            a_objectives=["sft"])
V1 = ROOT / "results" / "ssah_smollm2_v1.md"


def rate_task(task: str, metric: str, rate: float, prompt_hash: str) -> dict:
    """A refusal task as in eval.json: the first round(rate * N) prompts are successes (or refusals)."""
    k = round(rate * N)
    return {"task": task, "metric": metric, "value": k / N, "n": N, "ci_low": 0.0, "ci_high": 1.0,
            "extra": {"attack_successes": k, "refusals": k, "prompt_hash": prompt_hash, "outcomes": [1] * k + [0] * (N - k),
                      "judge": "FakeJudge"}}


def ppl_task(task: str, ppl: float, prompt_hash: str) -> dict:
    """A perplexity task: N references of 4 tokens, per-prompt losses spread around log(ppl)."""
    pairs = [[4 * (math.log(ppl) + 0.1 * ((i % 3) - 1)), 4] for i in range(N)]
    value = math.exp(sum(p[0] for p in pairs) / sum(p[1] for p in pairs))
    return {"task": task, "metric": "ppl", "value": value, "n": N, "ci_low": value * 0.9, "ci_high": value * 1.1,
            "extra": {"prompt_hash": prompt_hash, "outcomes": pairs}}


def default_values(name: str, labels: dict) -> dict:
    """A study in which every claim holds: {task: value}."""
    seed = labels.get("seed", 0) or 0
    j = 0.025 * seed  # one prompt per seed: the seeds differ a little
    v = {"harmful": 0.1, "oktest": 0.4, "ppl": 6.0, "ppl_dolly": 8.0}
    if name == "shipped":
        v.update(harmful=0.9, oktest=0.1, ppl=7.0)
    elif name == "aligned_aoaprompt":
        v.update(harmful=0.05)
    elif labels.get("claim") == "a":
        v.update({"full": {"harmful": 0.1 + j, "oktest": 0.4}, "ru_only": {"harmful": 0.2 + j, "oktest": 0.2},
                  "random": {"harmful": 0.6 + j, "oktest": 0.3}}[labels["method"]])
    elif labels.get("claim") == "b":
        cls = labels["ablated"]
        v.update({"esu": {"harmful": 0.6}, "euu": {"ppl": 20.0}, "cu": {"harmful": 0.2, "ppl": 6.3},
                  "ru": {"harmful": 0.125, "ppl": 6.2}, "random_esu": {"harmful": 0.15 + j},
                  "random_euu": {"ppl": 6.5 + seed}, "random_cu": {"ppl": 6.5},
                  "random_ru": {"ppl": 6.5 + seed}}[cls])
    elif labels.get("claim") == "c":
        v.update({"none": {"harmful": 0.8 + j, "oktest": 0.1}, "esu": {"harmful": 0.3 + j},
                  "esu_cu": {"harmful": 0.25 + j}, "random": {"harmful": 0.75 + j}, "layers": {"harmful": 0.5}}
                 [labels["freeze"]])
        ut = labels["utility_task"]
        v[ut] = {"none": 5.0, "esu": 5.1, "esu_cu": 5.2, "random": 5.0, "layers": 5.5}[labels["freeze"]]
    return v


def write_study(study, values=default_values, skip=(), hashes=None, settings=None, scale=None):
    """Every stage of the v2 plan at SCALE (except `skip`), as the runner writes them, plus study.json.

    values(name, labels) -> {task: value}; hashes: {(stage, task): prompt_hash} overrides."""
    hashes = hashes or {}
    scale = scale or SCALE
    stages = plan(scale, str(study))
    for s in stages:
        if s.name in skip:
            continue
        d = study / s.name
        d.mkdir(parents=True)
        if s.kind == "attribute":
            (d / "unit_map.safetensors").write_text("")
            continue
        v = values(s.name, s.labels)
        ev = {}
        for t in ("harmful", "oktest"):
            ev[t] = rate_task(t, "asr" if t == "harmful" else "refusal_rate", v[t], hashes.get((s.name, t), f"{t}-h"))
        for t in ("ppl", "ppl_dolly"):
            ev[t] = ppl_task(t, v[t], hashes.get((s.name, t), f"{t}-h"))
        (d / "eval.json").write_text(json.dumps(ev))
        ablation = None if s.labels.get("claim") != "b" else {"units_zeroed": 800 + len(s.name)}
        (d / "eval_meta.json").write_text(json.dumps({"model": "FakeLM-135M", "model_path": None,
                                                      "ablation": ablation, "judge": "FakeJudge"}))
        fr = s.labels.get("freeze") or s.labels.get("method")
        train = None if s.kind == "eval" else {
            "global_step": 17, "train_examples": 123, "data_stats": {"sources": {"refusal": 60, "alpaca": 63}},
            "freeze": None if fr in (None, "none", "full") else {
                "strategy": fr, "entries": {"frozen": 10, "trainable": 990, "frozen_share": 0.0123,
                                            "trainable_share": 0.9877}},
            "frozen_max_abs_delta": 0.0, "lr": 5e-05, "epochs": 1}
        (d / "point.json").write_text(json.dumps({"name": s.name, "kind": s.kind, "model": s.model,
                                                  "labels": s.labels, "train": train, "seconds": 1.0}))
    names = [s.name for s in stages]
    ran = [n for n in names if n not in skip]
    (study / "study.json").write_text(json.dumps({
        "scale": "cpu", "hardware": "Fake hardware (7 cores)", "device": "cpu", "minutes": 12.5,
        "budget_minutes": 600, "planned": names, "ran": ran, "skipped": [], "not_run": list(skip), "failed": {},
        "settings": settings or dataclasses.asdict(scale)}))
    return study


def study_verdicts(study) -> dict:
    return {v.claim: v for v in verdicts(load_study(study))}

