"""The command line the runner's drivers share (safety_units.experiments.study.cli): the same flags in
scripts/run_study.py and scripts/run_defenses.py, --list prints the plan and runs nothing, failed stages exit
non-zero naming them, --report-only without artifacts fails cleanly. Running stages is test_study_runner.py's."""
from pathlib import Path

import pytest
from conftest import load_script

from safety_units.experiments.defense_bench import plan as bench_plan
from safety_units.experiments.study import plan as study_plan
from safety_units.experiments.study.cli import exit_on_failures, runner_parser


def parser():
    return runner_parser("the study", study_plan.SCALES, "--study-dir", Path("logs/study"), Path("results"), "ssah")


def test_the_shared_flags_and_their_defaults():
    args = parser().parse_args([])
    assert (args.scale, args.run_dir, args.results_dir, args.report_name) == ("cpu", Path("logs/study"),
                                                                              Path("results"), "ssah")
    assert not (args.resume or args.force or args.list or args.report_only or args.no_report)
    assert (args.only, args.budget_minutes, args.workers, args.extra) == (None, None, None, [])
    args = parser().parse_args(["--scale", "gpu", "--study-dir", "/tmp/s", "--resume", "--only", "^c_",
                                "--budget-minutes", "90", "--workers", "3", "--set", "a=1", "--set", "b=2"])
    assert (args.scale, args.run_dir, args.resume, args.only, args.budget_minutes, args.workers, args.extra) == (
        "gpu", Path("/tmp/s"), True, "^c_", 90.0, 3, ["a=1", "b=2"])


def test_an_unknown_scale_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["--scale", "tpu"])
    assert e.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


DRIVERS = {"run_study": ("--study-dir", study_plan, 32), "run_defenses": ("--bench-dir", bench_plan, 48)}


@pytest.mark.parametrize("script", sorted(DRIVERS))
def test_list_prints_the_cpu_plan_and_runs_nothing(tmp_path, capsys, script):
    dir_flag, plans, width = DRIVERS[script]
    run_dir = tmp_path / "runs"
    load_script(script).main(["--list", dir_flag, str(run_dir)])
    stages = plans.plan(plans.SCALES["cpu"], str(run_dir.resolve()))
    lines = capsys.readouterr().out.splitlines()
    assert len(stages) > 10 and lines == [f"{s.name:{width}s} {s.kind:10s} from {s.model}" for s in stages]
    assert not run_dir.exists()


def test_failed_stages_exit_non_zero_naming_them(tmp_path):
    exit_on_failures({"ran": ["a"], "failed": {}}, tmp_path)  # nothing failed: returns
    exit_on_failures({}, tmp_path)  # --report-only: no record
    with pytest.raises(SystemExit, match=rf"2 stage\(s\) failed: b_esu, c_x; see their logs in {tmp_path}"):
        exit_on_failures({"failed": {"b_esu": "OOM", "c_x": "NaN"}}, tmp_path)


def test_report_only_without_artifacts_fails_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        load_script("run_study").main(["--report-only", "--study-dir", str(tmp_path / "logs"),
                                       "--results-dir", str(tmp_path / "res")])
    assert e.value.code == 1 and "no study evaluations" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()
