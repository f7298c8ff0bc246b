"""The study's stages as submitit jobs (safety_units.experiments.study.jobs, `--launcher submitit`) on submitit's local
executor and the tiny plan of test_study_runner: the dependency graph, a stage's inputs run first, a failed stage is
reported with its job's logs and its dependents do not run, --resume picks up what ran, and a stage's outputs equal
the in-process runner's."""
import json

from test_study_runner import TINY

from safety_units.experiments.study.jobs import dependencies, run_study_jobs
from safety_units.experiments.study.plan import plan
from safety_units.experiments.study.runner import run_study

ONLY = r"^(align|attribute_aligned|b_esu|c_alpaca_none_s0)$"


def test_inputs_are_the_setup_in_order_and_the_stages_whose_files_a_stage_needs(tmp_path):
    stages = [s for s in plan(TINY, str(tmp_path)) if s.name in ("attribute_base", "align", "shipped", "b_esu")]
    deps = dependencies(stages)
    assert deps["attribute_base"] == [] and deps["align"] == ["attribute_base"]
    assert deps["b_esu"] == ["attribute_base", "align", "shipped"]  # every stage after the whole setup
    needing = stages[-1].__class__("x", "eval", "aligned", needs=["b_esu/eval.json"])
    assert dependencies([*stages, needing])["x"] == ["attribute_base", "align", "shipped", "b_esu"]


def test_stages_run_as_jobs_fail_with_their_logs_resume_and_equal_the_in_process_runs(tmp_path):
    study, jobs = tmp_path / "jobs", {"timeout_min": 20}
    rec = run_study_jobs(TINY, study, extra=[], only=ONLY.replace("attribute_aligned|", ""), cluster="local",
                         job_params=jobs)
    assert sorted(rec["ran"]) == ["align", "c_alpaca_none_s0"]
    assert set(rec["failed"]) == {"b_esu"}  # no map of the aligned model: fails in its job, clearly
    msg = rec["failed"]["b_esu"]
    assert "has not finished" in msg or "does not exist" in msg, msg  # the stage's own error, then where to look
    assert ".submitit" in msg and "b_esu.log" in msg and "Traceback" in (study / "b_esu.log").read_text()
    recorded = json.loads((study / "study.json").read_text())
    assert recorded["failed"] == rec["failed"] and sorted(recorded["ran"]) == sorted(rec["ran"])
    # the same stages in one process: the same outputs
    ref = tmp_path / "inproc"
    run_study(TINY, ref, only=r"^align$")
    for name in ("align",):
        a, b = (json.loads((d / name / "eval.json").read_text()) for d in (study, ref))
        assert {t: v["value"] for t, v in a.items()} == {t: v["value"] for t, v in b.items()}, name
    # --resume: what ran is kept, the missing map's stage and the failed one run now
    again = run_study_jobs(TINY, study, only=ONLY, resume=True, cluster="local", job_params=jobs)
    assert sorted(again["ran"]) == ["attribute_aligned", "b_esu"] and again["failed"] == {}
    assert sorted(again["skipped"]) == ["align", "c_alpaca_none_s0"]
