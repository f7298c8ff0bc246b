"""The SSAH study v2's statistics and verdicts (safety_units.experiments.study.verdicts) on a synthetic study dir
(fake_study.py): conditions over seeds, pooled paired comparisons, and each claim's criterion."""

import math

import pytest
from fake_study import N, default_values, study_verdicts, write_study

from safety_units.evaluation.compare import PromptMismatchError
from safety_units.experiments.study.verdicts import ERROR, MARGIN, compare, cond, diff_text, load_study, verdicts


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

