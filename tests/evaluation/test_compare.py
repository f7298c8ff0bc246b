"""Paired comparisons between evaluations (safety_units.evaluation.compare): the statistics, the table, the CLI."""

import json
import math

import pytest
from conftest import load_script

from safety_units.evaluation.compare import PromptMismatchError, compare_table, paired_difference
from safety_units.utils.stats import paired_bootstrap


def fake(task: str, metric: str, outcomes: list, prompt_hash: str | None = "h1", judge: str = "patterns") -> dict:
    """A TaskResult as stored in eval.json."""
    if metric == "ppl":
        value = math.exp(sum(o[0] for o in outcomes) / sum(o[1] for o in outcomes))
    else:
        value = sum(outcomes) / len(outcomes)
    extra = {"outcomes": outcomes} if metric == "ppl" else {"outcomes": outcomes, "judge": judge}
    if prompt_hash is not None:
        extra["prompt_hash"] = prompt_hash
    return {"task": task, "metric": metric, "value": value, "n": len(outcomes), "ci_low": 0.0, "ci_high": 1.0,
            "extra": extra}


A = [1, 1, 0, 0, 1, 0, 1, 1]
B = [0, 1, 1, 0, 0, 0, 0, 1]  # 3 prompts 1 -> 0, 1 prompt 0 -> 1
PPL_A, PPL_B = [[2.0, 1], [4.0, 3]], [[1.0, 1], [3.0, 3]]


def test_paired_difference_binary_by_hand():
    d = paired_difference(fake("harmful", "asr", A), fake("harmful", "asr", B), "harmful")
    assert d["diff"] == pytest.approx(3 / 8 - 5 / 8)
    # McNemar: 4 discordant pairs, 1 of them 0 -> 1: p = 2 * P(Bin(4, 1/2) <= 1) = 2 * 5/16
    assert d["p_mcnemar"] == pytest.approx(10 / 16)
    assert (d["ci_low"], d["ci_high"]) == paired_bootstrap(A, B)[1:] and d["ci_low"] < d["diff"] < d["ci_high"]
    # every prompt flips 0 -> 1: every resample differs by exactly 1, and p = 2 / 2**5
    d = paired_difference(fake("t", "refusal_rate", [0] * 5), fake("t", "refusal_rate", [1] * 5), "t")
    assert (d["diff"], d["ci_low"], d["ci_high"], d["p_mcnemar"]) == (1.0, 1.0, 1.0, 2 / 32)


def test_paired_difference_perplexity_pools_tokens():
    d = paired_difference(fake("ppl", "ppl", PPL_A), fake("ppl", "ppl", PPL_B), "ppl")
    assert d["diff"] == pytest.approx(math.e - math.exp(6 / 4)) and d["p_mcnemar"] is None
    # a resample holds item 0, item 1 or both: its change is e - e^2, e - e^(4/3) or e - e^1.5
    assert math.e - math.e**2 - 1e-9 <= d["ci_low"] <= d["ci_high"] <= math.e - math.exp(4 / 3) + 1e-9


def test_paired_difference_refuses_other_prompts_and_old_files():
    with pytest.raises(PromptMismatchError, match=r"task harmful: .*prompt_hash h1 vs h2"):
        paired_difference(fake("harmful", "asr", A), fake("harmful", "asr", B, prompt_hash="h2"), "harmful")
    with pytest.raises(PromptMismatchError, match=r"task q_harm: the second evaluation has no prompt_hash.*re-run"):
        paired_difference(fake("q_harm", "asr", A), fake("q_harm", "asr", B, prompt_hash=None), "q_harm")


def test_compare_table_numbers_judge_and_mismatch():
    before = {"harmful": fake("harmful", "asr", A), "ppl": fake("ppl", "ppl", PPL_A)}
    after = {"harmful": fake("harmful", "asr", B), "ppl": fake("ppl", "ppl", PPL_B)}
    table = compare_table(before, after)
    lo, hi = paired_bootstrap(A, B)[1:]
    assert (f"| harmful | asr | 0.6250 [0.000, 1.000] | 0.3750 [0.000, 1.000] | -0.2500 | [{lo:+.4f}, {hi:+.4f}] "
            f"| 0.625 | 8 |") in table
    assert "| ppl | ppl | 4.4817 [0.000, 1.000] | 2.7183 [0.000, 1.000] | -1.7634 |" in table
    assert table.splitlines()[-1].endswith("| n/a | 2 |")  # no McNemar test for perplexity
    assert table.startswith("Refusal judge: patterns.")
    assert compare_table(before, after, judge="ensemble(3)").startswith("Refusal judge: ensemble(3).")
    after["harmful"]["extra"]["judge"] = "StringJudge"  # e.g. completions re-judged
    assert compare_table(before, after).startswith("Refusal judge: patterns (before), StringJudge (after).")
    after["ppl"]["extra"]["prompt_hash"] = "other"
    with pytest.raises(PromptMismatchError, match=r"task ppl: .*h1 vs other"):
        compare_table(before, after)


def test_compare_cli(tmp_path, capsys):
    for name, outcomes, h in (("a", A, "h1"), ("b", B, "h1"), ("c", B, "h9")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"harmful": fake("harmful", "asr", outcomes,
                                                                               prompt_hash=h)}))
    text = load_script("compare").main([str(tmp_path / "a"), str(tmp_path / "b" / "eval.json"),
                                        "--out", str(tmp_path / "cmp.md")])
    assert "| harmful | asr | 0.6250" in text and "| -0.2500 |" in text and "| 0.625 | 8 |" in text
    assert (tmp_path / "cmp.md").read_text() == text and "| A | B |" in text
    with pytest.raises(SystemExit) as e:
        load_script("compare").main([str(tmp_path / "a"), str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "different prompts" in err and "h1 vs h9" in err
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "eval_before.json").write_text("{}")
    with pytest.raises(SystemExit):
        load_script("compare").main([str(tmp_path / "a"), str(tmp_path / "train")])
    assert "found eval_before.json" in capsys.readouterr().err
