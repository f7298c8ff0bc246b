"""The SSAH study's verdicts and report (safety_units.study_verdicts / study_report, scripts/run_study.py),
on synthetic eval.json dicts and a fake tree of run artifacts -- no model runs."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, compose
from omegaconf import OmegaConf

from safety_units.compare import PromptMismatchError
from safety_units.errors import ConfigError
from safety_units.study_report import build_report, eval_runs, train_runs
from safety_units.study_verdicts import POOLED, paired_table, pooled, verdicts

N = 20


def rate_task(task: str, metric: str, k: int, n: int = N, prompt_hash: str = "h") -> dict:
    """A refusal task as in eval.json: the first k of n prompts are attack successes (or refusals)."""
    outcomes = [1] * k + [0] * (n - k)
    return {"task": task, "metric": metric, "value": k / n, "n": n, "ci_low": 0.0, "ci_high": 1.0,
            "extra": {"attack_successes": k, "refusals": n - k, "prompt_hash": f"{task}-{prompt_hash}",
                      "outcomes": outcomes, "judge": "fake"}}


def ppl_task(log_ppl: float, n: int = N, prompt_hash: str = "p") -> dict:
    """A perplexity task: n references of 4 tokens each, every one at the same per-token loss."""
    return {"task": "ppl", "metric": "ppl", "value": math.exp(log_ppl), "n": n, "ci_low": 0.0, "ci_high": 99.0,
            "extra": {"prompt_hash": prompt_hash, "outcomes": [[4 * log_ppl, 4]] * n}}


def ev(asr: float | None, log_ppl: float | None = 1.0, **hashes) -> dict:
    """An eval.json with pooled ASR `asr` (over `harmful` and `q_harm`) and perplexity exp(log_ppl)."""
    out = {}
    if asr is not None:
        k = round(asr * N)
        out["harmful"] = rate_task("harmful", "asr", k, prompt_hash=hashes.get("harmful", "h"))
        out["q_harm"] = rate_task("q_harm", "asr", k)
    if log_ppl is not None:
        out["ppl"] = ppl_task(log_ppl, prompt_hash=hashes.get("ppl", "p"))
    out["oktest"] = rate_task("oktest", "refusal_rate", 5)
    return out


def by_claim(vs, prefix: str):
    [v] = [v for v in vs if v.claim.startswith(prefix)]
    return v


def ablation_evals(esu: float, rnd_esu: list[float], euu_ppl: float, rnd_euu_ppl: list[float]) -> dict:
    evals = {"eval_align_none": ev(0.20, 1.0), "ablate_esu": ev(esu, 1.05), "ablate_euu": ev(0.2, euu_ppl),
             "ablate_ru": ev(0.2, 1.2)}
    for s, (a, p) in enumerate(zip(rnd_esu, rnd_euu_ppl)):
        evals[f"ablate_random_esu_s{s}"] = ev(a, 1.0)
        evals[f"ablate_random_euu_s{s}"] = ev(0.2, p)
        evals[f"ablate_random_ru_s{s}"] = ev(0.2, 1.1)
    return evals


# --------------------------------------------------------------------------- (b)
def test_esu_that_lowers_asr_is_no_support_even_when_random_sets_lower_it_more():
    # ESU 0.20 -> 0.125, random sets of ESU's size -> 0.0: ESU is 0.125 above every random set, but zeroing ESU
    # made the model safer, which is no evidence that ESU carry safety.
    evals = ablation_evals(0.125, [0.0, 0.0], 3.0, [3.2, 3.3])
    vs = verdicts(evals, [], [0, 1], {})
    assert by_claim(vs, "(b) ESU").status == "refuted"
    assert "raises ASR (no)" in by_claim(vs, "(b) ESU").text
    # EUU raise perplexity a lot, but less than random sets of EUU's own size: refuted, not "partly confirmed"
    assert by_claim(vs, "(b) EUU").status == "refuted"
    assert all("partly" not in v.status for v in vs)


def test_esu_and_euu_beyond_their_size_matched_random_sets_confirm():
    evals = ablation_evals(0.60, [0.25, 0.20], 3.0, [1.2, 1.1])
    vs = verdicts(evals, [], [0, 1], {})
    assert by_claim(vs, "(b) ESU").status == "confirmed"
    assert by_claim(vs, "(b) EUU").status == "confirmed"
    # one random seed within the margin of ESU is enough to refute
    evals["ablate_random_esu_s1"] = ev(0.55, 1.0)
    assert by_claim(verdicts(evals, [], [0, 1], {}), "(b) ESU").status == "refuted"


def test_each_class_is_compared_with_its_own_random_sets():
    # The EUU verdict reads only the random-like-EUU runs: dropping a random-like-ESU run leaves it testable.
    evals = ablation_evals(0.60, [0.25, 0.20], 3.0, [1.2, 1.1])
    del evals["ablate_random_esu_s0"]
    vs = verdicts(evals, [], [0, 1], {})
    assert by_claim(vs, "(b) EUU").status == "confirmed"
    assert by_claim(vs, "(b) ESU").status == "not testable"
    assert "ablate_random_esu_s0 (harmful_pooled)" in by_claim(vs, "(b) ESU").text


# --------------------------------------------------------------------------- missing values
def test_missing_perplexity_is_na_and_not_zero():
    evals = ablation_evals(0.60, [0.25, 0.20], 3.0, [1.2, 1.1])
    evals["ablate_euu"] = ev(0.2, None)  # the EUU ablation has no perplexity
    v = by_claim(verdicts(evals, [], [0, 1], {}), "(b) EUU")
    assert v.status == "not testable" and "ablate_euu (ppl)" in v.text
    table = paired_table(evals, "eval_align_none", [("zero EUU", "ablate_euu")])
    assert table.splitlines()[-1].endswith("| n/a | n/a |")
    # (a): the shipped model's perplexity is missing -> no verdict from a zero in its place
    a = {"eval_shipped": ev(0.9, None), "eval_align_none": ev(0.2, 1.0), "eval_align_ru_only": ev(0.3, 0.9)}
    v = by_claim(verdicts(a, [], [], {"": "5e-5"}), "(a)")
    assert v.status == "not testable" and "eval_shipped (ppl)" in v.text


def test_alignment_budget_status():
    # perplexity: shipped e^1, full e^0.9, RU-only e^0.7 (a smaller increase than full)
    a = {"eval_shipped": ev(0.9, 1.0), "eval_align_none": ev(0.2, 0.9), "eval_align_ru_only": ev(0.4, 0.7)}
    assert by_claim(verdicts(a, [], [], {"": "5e-5"}), "(a)").status == "confirmed"  # 71% of the gain, cheaper
    a["eval_align_ru_only"] = ev(0.7, 0.7)  # 29% of the gain: the lower cost alone is no support
    v = by_claim(verdicts(a, [], [], {"": "5e-5"}), "(a)")
    assert v.status == "refuted" and "lr 5e-5" in v.claim


def test_freezing_verdict_needs_all_runs():
    evals = {"eval_align_none": ev(0.1), "eval_benign_none_s1": ev(0.8), "eval_benign_esu_s1": ev(0.3),
             "eval_benign_esu_cu_s1": ev(0.75), "eval_benign_random_s1": ev(0.8)}
    assert by_claim(verdicts(evals, [1], [], {}), "(c) freezing under benign").status == "confirmed"
    del evals["eval_benign_random_s1"]
    v = by_claim(verdicts(evals, [1], [], {}), "(c) freezing under benign")
    assert v.status == "not testable" and "eval_benign_random_s1" in v.text


# --------------------------------------------------------------------------- pairing
def test_runs_on_other_prompts_are_not_compared():
    evals = ablation_evals(0.60, [0.25, 0.20], 3.0, [1.2, 1.1])
    evals["ablate_esu"] = ev(0.6, 1.0, harmful="other")
    with pytest.raises(PromptMismatchError, match="eval_align_none vs ablate_esu"):
        verdicts(evals, [], [0, 1], {})


def test_pooled_asr_concatenates_tasks_in_a_fixed_order():
    e = ev(0.25)
    flipped = {"q_harm": e["q_harm"], "harmful": e["harmful"]}
    p, q = pooled(e), pooled(flipped)
    assert p["extra"]["outcomes"] == q["extra"]["outcomes"] == e["harmful"]["extra"]["outcomes"] + \
        e["q_harm"]["extra"]["outcomes"]
    assert p["extra"]["prompt_hash"] == q["extra"]["prompt_hash"] and p["n"] == 2 * N and p["value"] == 0.25
    assert p["task"] == POOLED and pooled({"ppl": e["ppl"]}) is None


# --------------------------------------------------------------------------- the report from artifacts
SEEDS, RSEEDS, TAGS = [42], [0, 1], [""]


def write_tree(study, lr="3e-5", scoring="snip", esu_share=0.02, total_share=0.09, tokens=77, judge="FakeJudge",
               skip=()):
    """Every run dir the report reads, with the settings it should quote."""
    evals = eval_runs(SEEDS, RSEEDS, TAGS)
    for i, r in enumerate(evals):
        if r in skip:
            continue
        d = study / r
        (d / ".hydra").mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps(ev(0.2 + 0.02 * i, 1.0 + 0.01 * i)))
        (d / "eval_meta.json").write_text(json.dumps({"judge": judge, "model": "FakeLM",
                                                          "ablation": {"units_zeroed": 100 + i}}))
        OmegaConf.save({"task_name": "evaluate", "judge": {"_target_": f"mod.{judge}"},
                        "eval": {"max_new_tokens": tokens, "template": "T: {prompt}"}}, d / ".hydra" / "config.yaml")
        OmegaConf.save(["experiment=ssah/evaluate", f"condition={r}"], d / ".hydra" / "overrides.yaml")
    for r in train_runs(SEEDS, TAGS):
        (study / r / "model").mkdir(parents=True)
        OmegaConf.save({"optim": {"lr": lr}, "trainer": {"max_epochs": 3, "accelerator": "cpu"},
                        "data": {"name": "alpaca", "num_samples": 123, "batch_size": 4,
                                 "sources": {"refusal": {"weight": 1}, "benign": {"weight": 2}}},
                        "freeze": {"strategy": r.split("_")[1], "total_share": total_share, "like": "esu_cu"},
                        "model": {"dtype": "float32"}}, study / r / "model" / "safety_units_config.yaml")
    for name in ("attribute_base", "attribute_aligned"):
        (study / name).mkdir(parents=True)
        meta = {"scoring": {"method": scoring, "tokens": "all"}, "normalization": "global",
                "classify": {"shares": {"esu": esu_share, "euu": 0.13, "ru": 0.15}},
                "calibration": {"safety": {"path": "/d/stl/safety.json", "nsamples": 64, "max_length": 256}}}
        total = {"all": {"units": 1000, **{c: {"count": 250, "share": 0.25} for c in ("esu", "euu", "cu", "ru")}}}
        (study / name / "unit_map.json").write_text(json.dumps({"metadata": meta, "total": total}))


def test_report_reads_its_settings_from_the_artifacts(tmp_path):
    write_tree(tmp_path / "a")
    md = build_report(tmp_path / "a", SEEDS, RSEEDS, TAGS, [("eval_shipped", "python planned.py")])
    for expected in ("scoring `snip`", "ESU 2%", "global normalisation", "calibration safety 64 x `stl/safety.json`",
                     "at most 77 new tokens", "FakeJudge (`mod.FakeJudge`)", "lr 3e-5", "random 9%",
                     "`refusal` weight 1, `benign` weight 2", "condition=eval_shipped", "# SSAH study on FakeLM",
                     f"| zero EUU | {100 + eval_runs(SEEDS, RSEEDS, TAGS).index('ablate_euu')} |"):
        assert expected in md, expected
    assert "pilot" not in md and "7.5%" not in md and "wifv" not in md and "planned.py" not in md  # recorded command
    write_tree(tmp_path / "b", lr="7e-4", scoring="wifv", esu_share=0.013, total_share=0.075, tokens=48,
               judge="OtherJudge")
    md2 = build_report(tmp_path / "b", SEEDS, RSEEDS, TAGS, [])
    for expected in ("scoring `wifv`", "ESU 1.3%", "at most 48 new tokens", "OtherJudge", "lr 7e-4", "random 7.5%"):
        assert expected in md2 and expected not in md, expected


def test_report_lists_missing_runs_and_refuses_mixed_judges(tmp_path):
    write_tree(tmp_path / "a", skip=("ablate_euu",))
    md = build_report(tmp_path / "a", SEEDS, RSEEDS, TAGS, [("ablate_euu", "python evaluate.py x")])
    assert "**Missing runs**" in md and "ablate_euu" in md and "python evaluate.py x   # not run" in md
    assert "(b) EUU carry utility -- not testable" in md
    write_tree(tmp_path / "b")
    (tmp_path / "b" / "ablate_ru" / "eval_meta.json").write_text(json.dumps({"judge": "Strings"}))
    with pytest.raises(ConfigError, match=r"different refusal judges.*Strings \(`mod.FakeJudge`\): ablate_ru\."):
        build_report(tmp_path / "b", SEEDS, RSEEDS, TAGS, [])


def load_study_script():
    spec = importlib.util.spec_from_file_location("run_study", ROOT / "scripts" / "run_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_report_only_without_artifacts_fails_and_writes_nothing(tmp_path, monkeypatch, capsys):
    study = load_study_script()
    monkeypatch.setattr(study, "STUDY", tmp_path / "logs")
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    with pytest.raises(SystemExit) as e:
        study.main(["--report-only"])
    assert e.value.code == 1 and "no study evaluations" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_every_ablated_class_gets_size_matched_random_controls(tmp_path):
    study = load_study_script()
    plan = {name: cmd for cmd, name, _ in study.stages(study.CPU, [42], [0, 1])}
    for cls in ("esu", "euu", "ru"):
        for s in (0, 1):
            cmd = plan[f"ablate_random_{cls}_s{s}"]
            assert f"ablate.random_like={cls}" in cmd and f"ablate.seed={s}" in cmd
            overrides = [c for c in cmd if "=" in c]
            cfg = compose("evaluate", overrides, output_dir=tmp_path)
            assert cfg.ablate.random_like == cls and cfg.ablate.seed == s and not cfg.ablate.classes


def test_attribution_settings_state_target_shares_or_the_set_difference_outcome():
    from safety_units.study_report import attribution_settings

    cal = {"safety": {"path": "/d/stl/safety.json", "nsamples": 64, "max_length": 192}}
    shares = attribution_settings("base", {"metadata": {
        "scoring": {"method": "wifv", "tokens": "all"}, "calibration": cal, "normalization": "per_layer",
        "classify": {"method": "shares", "shares": {"esu": 0.013, "ru": 0.15}}}})
    assert "target shares per kind ESU 1.3% / RU 15%" in shares and "safety 64 x `stl/safety.json`" in shares
    diff = attribution_settings("base", {"metadata": {
        "scoring": {"method": "snip", "tokens": "response"}, "calibration": cal, "normalization": "per_layer",
        "classify": {"method": "set_difference", "top_safety": 0.05, "top_utility": 0.05, "bottom": 0.3},
        "class_shares": {"mlp": {"esu": 0.021, "euu": 0.02, "cu": 0.029, "ru": 0.93}}}})
    assert "top 5% by safety and top 5% by utility (RU: bottom 30% on both)" in diff
    assert "resulting shares mlp ESU 2.1% / EUU 2.0% / CU 2.9% / RU 93.0%" in diff and "target" not in diff


def test_resume_skips_a_finished_stage_and_reruns_a_changed_one(tmp_path, monkeypatch):
    study = load_study_script()
    monkeypatch.setattr(study, "STUDY", tmp_path / "logs")
    monkeypatch.setattr(study, "ROOT", tmp_path)
    calls = []

    def fake_run(cmd, cwd, stdout, stderr, check, env):  # the stage "runs": it writes its output
        calls.append(cmd)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(study.subprocess, "run", fake_run)
    done = tmp_path / "logs" / "attribute_base" / "unit_map.safetensors"
    cmd = [sys.executable, "attribute.py", "experiment=ssah/attribute_base", "calibration.nsamples=128"]
    assert study.run(cmd, "attribute_base", done, force=False, resume=True) == "ran"
    assert study.run(cmd, "attribute_base", done, force=False, resume=True) == "skipped" and len(calls) == 1
    with pytest.raises(SystemExit, match="pass --resume"):
        study.run(cmd, "attribute_base", done, force=False, resume=False)
    changed = [*cmd[:-1], "calibration.nsamples=64"]  # another config: the finished output is stale
    assert study.run(changed, "attribute_base", done, force=False, resume=True) == "ran" and len(calls) == 2
    assert study.run(changed, "attribute_base", done, force=True, resume=True) == "ran" and len(calls) == 3
