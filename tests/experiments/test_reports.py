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
        harm_judge_report.harm_config(["judge.layers=[0.5]"])
    with pytest.raises(ConfigError, match="Could not override 'harm_judge.nope'"):
        harm_judge_report.harm_config(["harm_judge.nope=1"])
    assert list(harm_judge_report.harm_config(["harm_judge.layers=[0.5]"]).harm_judge.layers) == [0.5]
    assert harm_judge_report.harm_config([], "mlp").harm_judge.head == "mlp"


def test_judge_metrics_count_wilson_proportions_and_f1():
    pred = [True] * 6 + [False] * 4
    truth = [True] * 4 + [False] * 2 + [True] + [False] * 3
    m = harm_judge_report.judge_metrics(pred, truth, n_boot=200)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 2, 1, 3)
    assert m["precision"]["value"] == 4 / 6 and m["recall"]["value"] == 4 / 5 and m["accuracy"]["k"] == 7
    assert m["f1"]["value"] == pytest.approx(8 / 11) and m["f1"]["ci"][0] <= 8 / 11 <= m["f1"]["ci"][1]
    assert m["predicted_harmful_rate"]["ci"][0] < 0.6 < m["predicted_harmful_rate"]["ci"][1]


def test_the_hs_judge_is_the_most_accurate_or_within_its_interval_the_least_biased():
    def judge(acc, lo, rate):
        return {"accuracy": {"value": acc, "ci": [lo, acc + 0.02]}, "predicted_harmful_rate": {"value": rate}}

    summary = {"data": {"true_harmful_rate": {"value": 0.5}},
               "judges": {"mlp": judge(0.86, 0.84, 0.60), "layers": judge(0.85, 0.83, 0.52),
                          "probe": judge(0.75, 0.73, 0.50), "patterns": judge(0.95, 0.9, 0.5)}}
    assert harm_judge_report.choose(summary) == (
        "layers", "accuracy within the 95% interval of the best (mlp) and a smaller rate bias")
    summary["judges"]["layers"]["accuracy"]["value"] = 0.80  # outside the best's interval now
    assert harm_judge_report.choose(summary) == ("mlp", "the highest accuracy")


def test_out_of_fold_scores_become_every_judge_variant_and_its_calibration():
    oof = {"probe": [0.9, 0.2, 0.7, 0.1], "layers": [0.8, 0.4, 0.6, 0.3], "mlp": [0.6, 0.2, 0.2, 0.9]}
    v = harm_judge_report.variants(oof, [False, False, True, False], {k: 0.5 for k in oof})
    assert set(v) == {"probe", "probe_and_not_refusal", "layers", "layers_and_not_refusal", "mlp",
                      "mlp_and_not_refusal", "ensemble", "patterns"}
    assert v["probe"]["pred"] == [True, False, True, False]
    assert v["probe_and_not_refusal"]["pred"] == [True, False, False, False]  # the refusal never counts
    assert v["ensemble"]["pred"] == [True, False, False, True]  # mean of layers and mlp: 0.7, 0.3, 0.4, 0.6
    assert v["patterns"]["pred"] == [True, True, False, True] and v["patterns"]["scores"] is None
    bins = harm_judge_report.calibration([0.05, 0.15, 0.12, 0.95], [False, True, False, True], bins=10)
    assert [(b["n"], b["harmful"]) for b in bins] == [(1, 0.0), (2, 0.5), (1, 1.0)]


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


def test_the_hs_judge_is_the_one_the_shipped_report_chose():
    """harm_report.HS_JUDGE (what the defense benchmark and run_study.py --judge-harm use) is choose()'s pick on
    the shipped results/harm_judge.json, and conf/harm_judge/hs.yaml is that candidate trained on every labelled
    pair -- the settings, hence the cache, of the head the cross-fitting trained."""
    from omegaconf import OmegaConf

    chosen, _ = harm_judge_report.choose(json.loads((RESULTS / "harm_judge.json").read_text()))
    hs = harm_judge_report.HS_JUDGE
    assert chosen == hs["choice"] == hs["candidate"] + "_and_not_refusal" * hs["and_not_refusal"]
    deployed = harm_judge_report.harm_config([], hs["config"]).harm_judge
    from safety_units.experiments.judges.harm_crossfit import OFF_TOPIC

    crossfitted = harm_judge_report.harm_config(["harm_judge.train.prompts=all",
                                                 f"harm_judge.train.off_topic.limit={OFF_TOPIC}"],
                                                hs["candidate"]).harm_judge
    assert OmegaConf.to_container(deployed) == OmegaConf.to_container(crossfitted)
    validation = harm_judge_report.validation(RESULTS / "harm_judge.json")
    assert validation["judge"] == chosen and validation["tp"] + validation["fn"] == 1733
