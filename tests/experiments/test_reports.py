"""The judges' reports, the quickstart's report and the mask's first look: rebuilt from the inputs shipped in
results/ byte for byte, and their rules on constructed cases (no model runs here)."""
import json
import shutil

import pytest
from conftest import ROOT

from safety_units.experiments import quickstart_report
from safety_units.experiments.judges import harm_report as harm_judge_report
from safety_units.experiments.judges import refusal_report as judge_report
from safety_units.experiments.validity import mask_preliminary
from safety_units.utils.errors import ConfigError

RESULTS = ROOT / "results"


def test_the_harm_judge_report_is_rebuilt_from_its_shipped_json(tmp_path):
    shutil.copyfile(RESULTS / "harm_judge.json", tmp_path / "harm_judge.json")
    md = harm_judge_report.write_report(tmp_path, md_only=True)
    assert md == (RESULTS / "harm_judge.md").read_text() == (tmp_path / "harm_judge.md").read_text()
    with pytest.raises(ConfigError, match="without --md-only"):
        harm_judge_report.write_report(tmp_path / "none", md_only=True)
    with pytest.raises(ConfigError, match="harm_judge.<key>=<value>"):
        harm_judge_report.harm_config(["judge.layer=0.5"])
    with pytest.raises(ConfigError, match="Could not override 'harm_judge.nope'"):
        harm_judge_report.harm_config(["harm_judge.nope=1"])
    assert harm_judge_report.harm_config(["harm_judge.layer=0.5"]).harm_judge.layer == 0.5


def test_judge_metrics_count_wilson_proportions_and_f1():
    pred = [True] * 6 + [False] * 4
    truth = [True] * 4 + [False] * 2 + [True] + [False] * 3
    m = harm_judge_report.judge_metrics(pred, truth, n_boot=200)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 2, 1, 3)
    assert m["precision"]["value"] == 4 / 6 and m["recall"]["value"] == 4 / 5 and m["accuracy"]["k"] == 7
    assert m["f1"]["value"] == pytest.approx(8 / 11) and m["f1"]["ci"][0] <= 8 / 11 <= m["f1"]["ci"][1]
    assert m["predicted_harmful_rate"]["ci"][0] < 0.6 < m["predicted_harmful_rate"]["ci"][1]


def test_hs_judge_prefers_the_smaller_rate_bias_within_the_best_f1_interval():
    def judge(f1, lo, rate):
        return {"f1": {"value": f1, "ci": [lo, f1 + 0.05]}, "predicted_harmful_rate": {"value": rate}}

    summary = {"data": {"true_harmful_rate": {"value": 0.5}},
               "judges": {"probe": judge(0.80, 0.75, 0.70), "strings": judge(0.77, 0.70, 0.52),
                          "patterns": judge(0.60, 0.55, 0.50), "asr_rule": judge(0.95, 0.9, 0.5)}}
    assert harm_judge_report.hs_judge(summary) == (
        "strings", "F1 within the 95% interval of the best (probe) and a smaller rate bias")
    summary["judges"]["strings"]["f1"]["value"] = 0.70  # outside the best's interval now
    assert harm_judge_report.hs_judge(summary) == ("probe", "the highest F1")


def test_refusal_judge_report_metrics_memo_and_tables():
    calls = []

    class Counting:
        def judge(self, prompts, completions):
            calls.append(len(prompts))
            return [type("V", (), {"refusal": c.startswith("I can't")})() for c in completions]

    memo = judge_report.Memo(Counting())
    assert memo.judge(["p"], ["I can't"]) is memo.judge(["p"], ["I can't"]) and calls == [1]
    labelled = {"truth": [True, True, False, False]}
    assert judge_report.set_metrics([True, False, True, False], labelled) == \
        {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "n": 4}
    assert judge_report.set_metrics([True, False], {"expect": False}) == {"share_compliance": 0.5, "n": 2}
    sets = {f"xstest_{f}": {"prompts": ["a", "b"], "completions": ["x", "y"], "truth": [True, False]}
            for f in judge_report.DEV_FILES}
    sets["stl_refusals@48"] = {"prompts": ["q1", "q2"], "completions": ["I can't", "Sure, here"], "expect": True}
    sets["alpaca_heldout_answers"] = {"prompts": ["r"], "completions": ["ok"], "expect": False}
    votes = {j: {k: [True, False][:len(s["completions"])] for k, s in sets.items()} for j in ("a", "b")}
    results = {j: {k: judge_report.set_metrics(v, sets[k]) for k, v in votes[j].items()} for j in votes}
    md = judge_report.render(["a", "b"], sets, results, votes, "x.PatternJudge")
    assert "| a | gpt4 | 2 | 1.000 | 1.000 | 1.000 |" in md
    assert "| judge | stl_refusals@48 | alpaca_heldout_answers |" in md and "| b | 0.500 | 0.000 |" in md
    assert "**The safety-tuned-llamas set is not all refusals.** 1 of its 2" in md and "*q2* -> \"Sure, here...\"" in md
    assert "| a | 1.000 | 1.000 |" in md  # kappa: identical votes


def test_the_quickstart_report_is_rebuilt_from_its_shipped_copies(tmp_path):
    """Every section but the judges' agreement (which runs the judges) equals the shipped report."""
    for name, run in (("ru_only", "ru"), ("random", "rnd")):
        shutil.copytree(RESULTS / "quickstart" / name, tmp_path / run)
    (tmp_path / "results").mkdir()
    text = quickstart_report.write_report(tmp_path / "ru", tmp_path / "rnd", tmp_path / "results" / "quickstart.md",
                                          [], False, "logs/quickstart_ru logs/quickstart_random --rejudge", tmp_path)
    assert text + "\n" == (RESULTS / "quickstart.md").read_text().split("## Agreement between judges")[0]
    (tmp_path / "rnd" / "eval_after.json").unlink()
    with pytest.raises(ConfigError, match="eval_after.json is missing"):
        quickstart_report.copy_run(tmp_path / "rnd", tmp_path / "copy")


def test_the_mask_first_look_is_rebuilt_from_its_shipped_runs(tmp_path):
    """results/mask_preliminary.md is a function of the runs shipped beside it (and the goal's criteria in code)."""
    text = mask_preliminary.write_report(RESULTS / "mask_preliminary" / "runs", tmp_path / "m.md")
    assert text == (RESULTS / "mask_preliminary.md").read_text()
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary == json.loads((RESULTS / "mask_preliminary" / "summary.json").read_text())
    assert set(summary["shares"]) == {"1", "2"} and all(len(v["random_seeds"]) == 3 for v in summary["shares"].values())
    with pytest.raises(ConfigError, match="does not exist"):
        mask_preliminary.build(tmp_path / "no_runs")
