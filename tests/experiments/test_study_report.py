"""The SSAH study v2 report (safety_units.experiments.study.report) on a synthetic study dir (fake_study.py): the
markdown, plots and summary.json from the artifacts only, partly run studies, and the v1 verdicts it compares with."""

import dataclasses
import json
import re

import pytest
from fake_study import SCALE, V1, N, default_values, study_verdicts, write_study

from safety_units.experiments.study.plan import plan
from safety_units.experiments.study.report import load_v1, v2_match, write_report
from safety_units.experiments.study.verdicts import load_study, verdicts
from safety_units.utils.stats import corrected_rate
from safety_units.utils.errors import ConfigError


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
    # with the judge's validation counts beside the flags, HS is also corrected for its errors (pooled over seeds)
    val = {"judge": "mlp", "tp": 900, "fn": 100, "tn": 700, "fp": 300, "source": "harm_judge.json"}
    for seed in (0, 1):
        (study / f"a_ru_only_dpo_lr2e-4_s{seed}" / "harm_judged.json").write_text(
            json.dumps({"harmful": [1] * 30 + [0] * 10, "validation": val}))
    md = write_report(study, tmp_path / "results", V1).read_text()
    row = next(x for x in md.splitlines() if x.startswith("| dpo | RU-only | 2e-4 |"))
    c = corrected_rate([1] * 30 + [0] * 10 + [1] * 30 + [0] * 10, 900, 100, 700, 300)
    assert c["corrected"] == pytest.approx(0.75)  # raw 0.75 = 0.9 * x + 0.3 * (1 - x): x = 0.75
    assert row.split(" | ")[4] == f"0.750 ± 0.000 (n=2) (corrected {c['corrected']:.3f} [{c['ci'][0]:.3f}, " \
                                  f"{c['ci'][1]:.3f}])"


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

