"""The SSAH study v2's verdicts and report (safety_units.experiments.study.verdicts / study_tables / study_report) on a
synthetic study dir -- eval.json, eval_meta.json, point.json, study.json as the runner writes them, no model runs --
and scripts/run_study.py."""

import dataclasses
import importlib.util
import json
import math
import re

import pytest
from conftest import ROOT

from safety_units.evaluation.compare import PromptMismatchError
from safety_units.utils.errors import ConfigError
from safety_units.experiments.study.plan import SCALES, plan
from safety_units.experiments.study.report import load_v1, v2_match, write_report
from safety_units.experiments.study.verdicts import (
    ERROR,
    MARGIN,
    compare,
    cond,
    diff_text,
    load_study,
    verdicts,
)

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


# --------------------------------------------------------------------------- statistics
def test_conditions_are_mean_and_sd_over_seeds_and_tests_pool_the_seeds(tmp_path):
    st = load_study(write_study(tmp_path / "s"))
    c = cond(st, ["c_alpaca_none_s0", "c_alpaca_none_s1"], "harmful")
    assert c["n"] == 2 and c["mean"] == pytest.approx(0.8125) and c["sd"] == pytest.approx(0.025 / math.sqrt(2))
    one = cond(st, ["c_alpaca_none_s0", "c_alpaca_none_s9"], "harmful")
    assert one["n"] == 1 and one["sd"] is None and one["missing"] == ["c_alpaca_none_s9"]
    d = compare(st, [("c_alpaca_none_s0", "c_alpaca_esu_s0"), ("c_alpaca_none_s1", "c_alpaca_esu_s1")], "harmful")
    assert d["n"] == 2 * N and d["diff"] == pytest.approx(-0.5) and d["p_mcnemar"] < 1e-6
    # the reference run repeated once per seed; the combined error outcome of (a) has both tasks' prompts
    e = compare(st, [("shipped", "a_full_lr5e-5_s0"), ("shipped", "a_full_lr5e-5_s1")], ERROR)
    assert e["n"] == 2 * 2 * N


def test_seeds_that_trained_identically_are_counted_once(tmp_path):
    """Two seeds with the same outcomes in both conditions are one experiment run twice: pooling them would double
    the evidence. Layers' harmful rate does not depend on the seed in the synthetic study."""
    st = load_study(write_study(tmp_path / "s"))
    pairs = [("c_alpaca_layers_s0", "c_alpaca_none_s0"), ("c_alpaca_layers_s1", "c_alpaca_none_s1")]
    assert compare(st, pairs, "harmful")["repeats"] == []  # none differs between seeds: both pairs count
    same = [("c_alpaca_layers_s0", "c_alpaca_layers_s0"), ("c_alpaca_layers_s1", "c_alpaca_layers_s1")]
    d = compare(st, same, "harmful")
    assert d["n"] == N and d["repeats"] == [["c_alpaca_layers_s1", "c_alpaca_layers_s1"]]
    twice = compare(st, [("shipped", "c_alpaca_layers_s0"), ("shipped", "c_alpaca_layers_s1")], "harmful")
    once = compare(st, [("shipped", "c_alpaca_layers_s0")], "harmful")
    assert twice["n"] == N and twice["p_mcnemar"] == once["p_mcnemar"]
    assert "1 identical seed pair(s) counted once" in diff_text(twice)


def test_a_seed_whose_prompts_differ_raises_naming_both_stages(tmp_path):
    study = write_study(tmp_path / "s", hashes={("c_alpaca_esu_s1", "harmful"): "other"})
    with pytest.raises(PromptMismatchError, match="c_alpaca_none_s1 vs c_alpaca_esu_s1: task harmful"):
        verdicts(load_study(study))


# --------------------------------------------------------------------------- verdicts
def test_claim_a_is_judged_per_objective(tmp_path):
    """With the objective axis, (a) has one verdict per objective; here DPO's RU-only loses to random."""
    scale = dataclasses.replace(SCALE, a_objectives=["sft", "dpo"], a_objective_lrs=["2e-4"])

    def values(name, labels):
        v = default_values(name, labels)
        if labels.get("objective") == "dpo" and labels.get("method") == "ru_only":
            v.update(harmful=0.9)
        return v

    study = write_study(tmp_path / "s", values, scale=scale)
    for seed in (0, 1):  # run_study.py --judge-harm's output for DPO's RU-only stages: 30 of 40 answers harmful
        (study / f"a_ru_only_dpo_lr2e-4_s{seed}" / "harm_judged.json").write_text(json.dumps({"harmful": [1] * 30 + [0] * 10}))
    vs = study_verdicts(study)
    assert vs["(a) alignment budget, sft"].status == "supported"
    assert vs["(a) alignment budget, dpo, lr 2e-4"].status == "refuted"
    assert "(a) alignment budget, dpo, lr 5e-5" not in vs
    md = write_report(study, tmp_path / "results", V1).read_text()
    assert "| objective | method | lr | ASR | HS (harm judge) |" in md
    row = next(x for x in md.splitlines() if x.startswith("| dpo | RU-only | 2e-4 |"))
    assert row.split(" | ")[4] == "0.750 ± 0.000 (n=2)"  # HS; the other rows have none: n/a
    assert "| sft | full | 2e-4 | " in md and next(x for x in md.splitlines() if x.startswith("| sft | full |")).split(" | ")[4] == "n/a"
    # the objective's effect: the verdict changes at 2e-4 and RU-only's ASR is higher by (36 - 8 + 36 - 9) / 80
    # (2 seeds x 40 prompts; SFT's RU-only at 0.2 + 0.025 * seed); full alignment is identical under both objectives
    eff = json.loads((tmp_path / "results" / "ssah_smollm2" / "summary.json").read_text())["a"]["objective_effects"]
    d = eff["dpo_lr2e-4"]
    assert d["verdict"] == "refuted" and d["sft_verdict"] == "supported" and d["changes_verdict"] is True
    assert d["vs_sft"]["ru_only"]["harmful"]["diff"] == pytest.approx(55 / 80)
    assert d["vs_sft"]["ru_only"]["harmful"]["p_mcnemar"] < 1e-6
    assert d["vs_sft"]["full"]["oktest"]["diff"] == 0 and d["lowers_overrefusal"] == {m: False for m in d["vs_sft"]}
    assert "- **dpo vs SFT at lr 2e-4:** (a) verdict refuted (SFT: supported; changes)." in md


def test_every_claim_is_supported_in_a_study_built_to_support_it(tmp_path):
    vs = study_verdicts(write_study(tmp_path / "s"))
    assert vs["(a) alignment budget"].status == "supported"
    assert vs["(a) alignment budget, lr 5e-5"].status == vs["(a) alignment budget, lr 2e-4"].status == "supported"
    assert "no random point dominates" in vs["(a) alignment budget"].text
    assert vs["(b) ESU safety-critical"].status == "supported"
    assert vs["(b) EUU utility-critical"].status == "supported"
    assert vs["(b) RU redundant"].status == "supported"
    assert vs["(b) CU (report only)"].status == "report only"
    threats = [c for c in vs if c.startswith("(c) ") and c != "(c) freezing under fine-tuning threats"]
    assert len(threats) == 5 and all(vs[c].status == "supported" for c in threats)
    assert vs["(c) freezing under fine-tuning threats"].numbers["supported"] == 5
    assert "p=" in vs["(c) benign: Alpaca"].text and "layers minus esu_cu" in vs["(c) benign: Alpaca"].text


def test_alignment_budget_refuted_mixed_and_not_distinguishable(tmp_path):
    def random_wins(name, labels):
        v = default_values(name, labels)
        if labels.get("method") == "random" and labels["lr"] == "2e-4":
            v.update(harmful=0.05, oktest=0.1)  # random alignment: fewer errors than RU-only at one lr
        return v

    vs = study_verdicts(write_study(tmp_path / "mixed", random_wins))
    assert vs["(a) alignment budget, lr 2e-4"].status == "refuted"
    assert vs["(a) alignment budget"].status == "mixed"
    assert "random lr 2e-4 dominates RU-only lr 5e-5" in vs["(a) alignment budget"].text

    def same(name, labels):
        v = default_values(name, labels)
        if labels.get("method") == "random":
            v.update(harmful=0.2 + 0.025 * labels["seed"], oktest=0.2)  # random = RU-only
        return v

    vs = study_verdicts(write_study(tmp_path / "same", same))
    assert vs["(a) alignment budget"].status == "not distinguishable"

    def only_random(name, labels):
        v = same(name, labels)
        if labels.get("method") == "random" and labels["lr"] == "5e-5":
            v.update(harmful=0.05, oktest=0.05)
        return v

    assert study_verdicts(write_study(tmp_path / "ref", only_random))["(a) alignment budget"].status == "refuted"


def test_ablation_verdicts_are_refuted_by_the_size_matched_random_sets(tmp_path):
    def weak(name, labels):
        v = default_values(name, labels)
        if name == "b_esu":
            v["harmful"] = 0.2  # only 0.05 - 0.075 above the random sets: below the margin
        if name == "b_random_euu_s1":
            v["ppl"] = 25.0  # one random set hurts perplexity more than EUU
        if name == "b_ru":
            v["harmful"] = 0.1 + MARGIN + 0.05  # zeroing RU raises ASR beyond the margin
        return v

    vs = study_verdicts(write_study(tmp_path / "s", weak))
    assert vs["(b) ESU safety-critical"].status == "refuted" and "(no)" in vs["(b) ESU safety-critical"].text
    assert vs["(b) EUU utility-critical"].status == "refuted"
    assert vs["(b) RU redundant"].status == "refuted"


def test_freezing_verdicts_premise_protection_and_utility(tmp_path):
    def threats(name, labels):
        v = default_values(name, labels)
        if labels.get("threat") == "dolly" and labels["freeze"] == "none":
            v["harmful"] = 0.15  # the attack barely works: premise fails
        if labels.get("threat") == "mix10" and labels["freeze"] in ("esu", "esu_cu"):
            v["harmful"] = 0.7 + 0.025 * labels["seed"]  # freezing does not lower ASR enough
        if labels.get("threat") == "aoa1" and labels["freeze"] in ("esu", "esu_cu"):
            v["ppl"] = 5.0 * 1.2  # protects, but costs 20% of the task's perplexity
        return v

    vs = study_verdicts(write_study(tmp_path / "s", threats))
    dolly = vs["(c) benign: Dolly"]
    assert dolly.status == "not testable" and "Premise fails" in dolly.text and "0.100" in dolly.text
    assert vs["(c) harmful mixture p=0.1"].status == "refuted"
    assert vs["(c) AOA, 1 epoch"].status == "refuted" and "does not protect" in vs["(c) AOA, 1 epoch"].text
    assert vs["(c) benign: Alpaca"].status == "supported" and vs["(c) AOA, 5 epochs"].status == "supported"
    overall = vs["(c) freezing under fine-tuning threats"]
    assert overall.status == "mixed" and overall.numbers == {"supported": 2, "refuted": 2, "not_testable": 1}


# --------------------------------------------------------------------------- the report
def test_report_writes_markdown_plots_and_summary(tmp_path):
    study = write_study(tmp_path / "logs" / "ssah_smollm2_v2")
    md_path = write_report(study, tmp_path / "results", V1)
    md = md_path.read_text()
    out = tmp_path / "results" / "ssah_smollm2"
    assert md_path == tmp_path / "results" / "ssah_smollm2.md"
    for png in ("a_frontier", "c_asr_vs_utility_benign", "c_asr_vs_utility_harmful_mix", "c_asr_vs_utility_aoa",
                "c_asr_vs_p", "c_asr_vs_aoa_epochs"):
        assert (out / f"{png}.png").stat().st_size > 1000, png
        assert f"](ssah_smollm2/{png}.png)" in md
    assert not re.search(r"\bnan\b", md, re.IGNORECASE) and "no data to plot" not in md
    summary = json.loads((out / "summary.json").read_text())
    assert {v["claim"]: v["status"] for v in summary["verdicts"]} == {
        c: v.status for c, v in study_verdicts(study).items()}
    for v in summary["verdicts"]:
        assert f"**{v['claim']} -- {v['status']}.**" in md
    # settings and numbers come from the artifacts
    for expected in ("# SSAH study v2 on FakeLM-135M", "Fake hardware (7 cores)", "took 12 min (time budget: 600 min)",
                     "**Refusal judge**: FakeJudge", f"`harmful` {N}", "1.23%", "| RU-only | 5e-5 |",
                     "### AOA, 5 epochs (`aoa5`; reference `aligned_aoaprompt`)", "| ESU | 805 |", "17 optimizer steps"):
        assert expected in md, expected
    assert "| (a) alignment budget, lr 5e-5 | refuted | (a) alignment budget, lr 5e-5 | supported |" in md
    assert "| (b) safety units | partly confirmed | (b) ESU safety-critical | supported |" in md
    assert "v2 runs 2 seed(s) (0, 1)" in md and "v1 fine-tuned each (c) condition with 1 seed(s) (42)" in md
    assert "v2 tests 5 (2 benign, 1 harmful_mix, 2 aoa)" in md and "v1 tested 2 threat model(s)" in md
    assert summary["header"]["aligned"]["change"]["harmful"]["diff"] == pytest.approx(0.1 - 0.9)
    assert summary["c"]["alpaca"]["rows"]["esu"]["asr"]["mean"] == pytest.approx(0.3125)


def test_a_partly_run_study_still_renders(tmp_path):
    skip = {s.name for s in plan(SCALE, "x") if s.name.startswith(("c_aoa", "b_random_euu", "aligned_aoaprompt"))}
    skip |= {"c_alpaca_esu_s1", "a_random_lr2e-4_s0", "a_random_lr2e-4_s1"}
    study = write_study(tmp_path / "s", skip=sorted(skip))
    vs = study_verdicts(study)
    assert vs["(b) EUU utility-critical"].status == "not testable"
    assert "b_random_euu_s0" in vs["(b) EUU utility-critical"].text
    assert vs["(c) AOA, 1 epoch"].status == "not testable" and "aligned_aoaprompt" in vs["(c) AOA, 1 epoch"].text
    assert vs["(a) alignment budget, lr 2e-4"].status == "not testable"
    assert vs["(a) alignment budget"].status == "supported"  # the lr that ran decides
    assert vs["(c) benign: Alpaca"].status == "supported"  # esu with one seed, esu_cu with both
    md = write_report(study, tmp_path / "results", tmp_path / "no_v1.md").read_text()
    assert "Not run (shown as n/a; no statistic uses them): " in md and "c_aoa5_layers_s1" in md
    assert "| esu | 0.300 ± n/a (n=1) |" in md
    assert "(c_asr_vs_aoa_epochs: no data to plot)" in md and "No v1 verdicts found" in md
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)
    assert not (tmp_path / "results" / "ssah_smollm2" / "c_asr_vs_aoa_epochs.png").exists()


def test_no_evaluations_means_no_report(tmp_path):
    (tmp_path / "s" / "attribute_base").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no study evaluations"):
        write_report(tmp_path / "s", tmp_path / "results", V1)
    assert not (tmp_path / "results").exists()


def test_v1_verdicts_are_the_frozen_reports_and_match_v2(tmp_path):
    v1 = load_v1(V1)
    lines = V1.read_text().splitlines()  # the data is the v1 report's verdict lines, word for word
    assert [f"- **{x['claim']} -- {x['status']}.**{x['text']}" for x in v1] == [ln for ln in lines
                                                                                 if ln.startswith("- **(")]
    assert [(x["claim"][:3], x["status"]) for x in v1] == [
        ("(a)", "refuted"), ("(a)", "partly confirmed"), ("(b)", "partly confirmed"), ("(c)", "refuted"),
        ("(c)", "refuted")]
    assert v1[1]["claim"] == "(a) alignment budget, lr 2e-4"
    vs = verdicts(load_study(write_study(tmp_path / "s")))
    match = {x["claim"]: [v.claim for v in v2_match(x["claim"], vs)] for x in v1}
    assert match["(a) alignment budget, lr 2e-4"] == ["(a) alignment budget, lr 2e-4"]
    assert match["(b) safety units"] == ["(b) ESU safety-critical"]
    assert match[v1[3]["claim"]] == ["(c) benign: Alpaca"]
    assert match[v1[4]["claim"]] == ["(c) AOA, 1 epoch", "(c) AOA, 5 epochs"]


def load_study_script():
    spec = importlib.util.spec_from_file_location("run_study", ROOT / "scripts" / "run_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_report_only_without_artifacts_fails_and_writes_nothing(tmp_path, capsys):
    study = load_study_script()
    with pytest.raises(SystemExit) as e:
        study.main(["--report-only", "--study-dir", str(tmp_path / "logs"), "--results-dir", str(tmp_path / "res")])
    assert e.value.code == 1 and "no study evaluations" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()
