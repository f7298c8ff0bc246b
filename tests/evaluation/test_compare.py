"""Same prompts for every model, and paired comparisons between evaluations (safety_units.evaluation.compare)."""

import json
import logging
import math

import pytest
from conftest import SHARED_DATA, compose, load_script
from omegaconf import OmegaConf

from safety_units.evaluation.compare import PromptMismatchError, compare_table, paired_difference
from safety_units.data.sources import normalize_prompt
from safety_units.evaluation.run import run_evaluate
from safety_units.evaluation.suite import prompt_set_texts, refusal_prompts
from safety_units.evaluation.task_results import judge_name, select_by_hash
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


# --------------------------------------------------------------------------- paired statistics
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


def test_judge_name_is_the_name_attribute_or_the_class():
    class Plain:
        pass

    class Named:
        name = "ensemble(strings, patterns)"

    assert judge_name(Plain()) == "Plain" and judge_name(Named()) == "ensemble(strings, patterns)"


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


# --------------------------------------------------------------------------- the same prompts for every model
def test_limit_picks_by_hash_whatever_else_is_removed():
    items = [f"Prompt number {i}: explain topic {i * 7}" for i in range(200)]
    picked = select_by_hash(items, 10, "0 harmful")
    assert len(picked) == 10 and picked == [x for x in items if x in picked]  # file order kept
    fewer = [x for i, x in enumerate(items) if x in picked or i % 3]  # a third of the others removed
    assert select_by_hash(fewer, 10, "0 harmful") == picked
    assert select_by_hash(items[::-1], 10, "0 harmful") == picked[::-1]  # the same set in any file order
    assert select_by_hash(items, 10, "1 harmful") != picked  # the seed and task name pick another sample


def test_refusal_prompts_do_not_depend_on_the_exclusion_set():
    cfg = compose("evaluate", ["model=tiny", "eval=harmful", "eval.limit=5"])
    task, exclude = cfg.eval.tasks.harmful, prompt_set_texts(cfg.eval.dedupe_against)
    _, picked, _ = refusal_prompts("harmful", task, cfg.eval, exclude)
    every_cfg = compose("evaluate", ["model=tiny", "eval=harmful"])
    _, every, _ = refusal_prompts("harmful", every_cfg.eval.tasks.harmful, every_cfg.eval, exclude)
    others = {normalize_prompt(ex.prompt) for ex in every[::2]} - {normalize_prompt(ex.prompt) for ex in picked}
    _, again, removed = refusal_prompts("harmful", task, cfg.eval, exclude | others)
    assert removed == len(others) > 100 and [ex.prompt for ex in again] == [ex.prompt for ex in picked]


def test_advbench_eval_half_keeps_all_250_prompts():
    """The default exclusion set holds only what is trained/calibrated on by default (not Wei et al.'s safety-short
    set, which reuses 179 of the eval half's prompts)."""
    cfg = compose("evaluate", ["model=tiny", "eval=harmful"])
    assert set(cfg.eval.dedupe_against) == {"refusal_stl", "advbench_train"}
    exclude = prompt_set_texts(cfg.eval.dedupe_against)
    _, examples, removed = refusal_prompts("harmful", cfg.eval.tasks.harmful, cfg.eval, exclude)
    assert len(examples) == 250 and removed == 0


def test_models_with_other_training_data_see_the_same_prompts(tiny, tmp_path, caplog):
    """Two models trained on different data (one on the AdvBench eval half, one on the harmless eval prompts) are
    evaluated on identical prompts; what each trained on is counted, not removed."""
    train = {"advbench": {"path": str(SHARED_DATA / "advbench" / "harmful_behaviors.csv"), "prompt": "goal",
                          "response": None, "hash_split": [0.5, 1.0]},
             "harmless": {"path": str(SHARED_DATA / "harmless" / "harmless_test.json"), "prompt": "instruction",
                          "response": None}}
    reports = {}
    for name, source in train.items():
        model_dir = tmp_path / name / "model"
        tiny.model.save_pretrained(model_dir)
        tiny.tokenizer.save_pretrained(model_dir)
        OmegaConf.save({"data": {"sources": {name: source}}}, model_dir / "safety_units_config.yaml")
        with caplog.at_level(logging.WARNING, logger="safety_units.evaluation.suite"):
            run_evaluate(compose("evaluate", ["model=hf", f"model.path={model_dir}", "eval=suite", "eval.limit=3",
                                              "eval.max_new_tokens=4"], output_dir=tmp_path / name))
        reports[name] = json.loads((tmp_path / name / "eval.json").read_text())
    adv, harmless = reports["advbench"], reports["harmless"]
    assert set(adv) == set(harmless) and all(adv[k]["extra"]["prompt_hash"] == harmless[k]["extra"]["prompt_hash"]
                                             for k in adv)
    assert (adv["harmful"]["extra"]["train_overlap"], harmless["harmful"]["extra"]["train_overlap"]) == (3, 0)
    assert (adv["harmless"]["extra"]["train_overlap"], harmless["harmless"]["extra"]["train_overlap"]) == (0, 3)
    assert "eval.tasks.harmful: 3 of 3 prompts occur in the evaluated model's training data" in caplog.text
    # the same weights on the same prompts: every paired change is exactly zero
    table = load_script("compare").main([str(tmp_path / "advbench"), str(tmp_path / "harmless")])
    assert "| harmful | asr |" in table and all("| +0.0000 | [+0.0000, +0.0000] |" in row
                                                for row in table.splitlines() if row.startswith("| harmful"))

