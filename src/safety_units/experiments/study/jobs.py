"""The study's (and the defense benchmark's) stages as cluster jobs: `--launcher submitit` (docs/cluster.md).

Every stage becomes one submitit job that runs StudyRunner.run_stage in a fresh process -- the same composed configs,
the same config hash, the same `<stage>.stage.json`, `point.json` and `eval.json` as the in-process runner, so
`--resume` and `--report-only` work unchanged whichever ran a stage. A stage's inputs are its dependencies: the setup
stages one after the other, every other stage after the whole setup, and a stage after whichever stage writes the
files it `needs`. On SLURM each job is submitted at once with `--dependency=afterok:<its inputs' job ids>` (a failed
input cancels its dependents); submitit's local executor has no dependencies, so there a stage is submitted when its
inputs have succeeded. The driver waits for every job, records each stage as ran / skipped / failed (with its job's
log paths) / not run (an input failed) in study.json, exactly as the in-process runner does.
"""

from __future__ import annotations

import time
from pathlib import Path

from safety_units.experiments.study.plan import Stage, dependencies, plan
from safety_units.experiments.study.runner import StudyRunner, config_hash, select, stage_configs
from safety_units.utils.errors import ConfigError


def run_one(scale, study: Path, extra: list[str], plan_fn, name: str) -> str:
    """A job: one stage, in this process (the driver decided it runs: existing outputs are overwritten)."""
    runner = StudyRunner(scale, study, extra, force=True, plan_fn=plan_fn, tag=f"[job {name}] ")
    stage = {s.name: s for s in plan_fn(scale, str(study))}[name]
    try:
        return runner.run_stage(stage)
    except Exception as e:
        runner.fail(stage, e)  # the traceback in <stage>.log, as in-process
        raise


def run_study_jobs(scale, study: Path, extra: list[str] | None = None, only: str | None = None,
                   resume: bool = False, force: bool = False, plan_fn=plan, cluster: str | None = None,
                   job_params: dict | None = None) -> dict:
    """runner.run_study's counterpart: (part of) the plan of `scale` as one submitit job per stage, on `cluster`
    slurm | local (None: submitit's choice) with the executor settings `job_params`."""
    stages = select(plan_fn(scale, str(study)), only)
    return run_jobs(StudyRunner(scale, study, extra, resume, force, plan_fn=plan_fn), stages, cluster, job_params)


def run_jobs(runner: StudyRunner, stages: list[Stage], cluster: str | None = None, params: dict | None = None,
             poll_s: float = 1.0) -> dict:
    """Run `stages` as submitit jobs (cluster: "slurm", "local" or None for submitit's choice); returns the record
    also written to study.json."""
    try:
        import submitit
    except ImportError as e:
        raise ConfigError("--launcher submitit needs submitit: pip install -e \".[cluster]\"") from e
    executor = submitit.AutoExecutor(folder=runner.study / ".submitit" / "%j", cluster=cluster)
    executor.update_parameters(**{"timeout_min": 240, **(params or {})})
    slurm = executor.cluster == "slurm"
    deps, todo = dependencies(stages), []
    for stage in stages:  # finished stages are skipped; existing outputs without --resume stop the run
        done = (runner.study / stage.name / stage.done_file).exists()
        cfgs = stage_configs(stage, runner.study, runner.scale, runner.extra)
        if done and runner.finished(stage, config_hash(cfgs)):
            runner.record["skipped"].append(stage.name)
        else:
            todo.append(stage)
    state = {name: "ran" for name in runner.record["skipped"]}  # name -> ran | failed | not_run (settled)
    jobs: dict[str, object] = {}
    print(f"[jobs] {len(todo)} stages on {executor.cluster}, {len(runner.record['skipped'])} finished", flush=True)
    while todo or any(n not in state for n in jobs):
        for stage in list(todo):
            inputs = deps[stage.name]
            if any(state.get(d) in ("failed", "not_run") for d in inputs):
                _settle(runner, state, stage.name, "not_run", jobs)
                todo.remove(stage)
            elif all(state.get(d) == "ran" or (slurm and d in jobs) for d in inputs):
                waits = [jobs[d].job_id for d in inputs if d in jobs and d not in state]
                extra = {"slurm_additional_parameters": {"dependency": "afterok:" + ":".join(waits)}} if waits else {}
                executor.update_parameters(name=stage.name, **extra)
                jobs[stage.name] = executor.submit(run_one, runner.scale, runner.study, runner.extra,
                                                   runner.plan_fn, stage.name)
                print(f"[jobs] {stage.name}: job {jobs[stage.name].job_id}", flush=True)
                todo.remove(stage)
        for name, job in jobs.items():
            if name not in state and job.done():
                try:
                    job.result()
                    _settle(runner, state, name, "ran", jobs)
                except Exception as e:  # noqa: BLE001 -- recorded; the stages that need it do not run
                    _settle(runner, state, name, "failed", jobs,
                            f"job {job.job_id}: {_last_error(runner.study / (name + '.log'), e)} (logs: "
                            f"{runner.study / (name + '.log')}, {job.paths.stdout}, {job.paths.stderr})")
        for name in list(jobs):  # submitted behind an input that failed (SLURM): never runs
            if name not in state and any(state.get(d) in ("failed", "not_run") for d in deps[name]):
                _settle(runner, state, name, "not_run", jobs)
        runner.write_record(stages)
        time.sleep(poll_s)
    runner.write_record(stages)
    return runner.record


def _last_error(stage_log: Path, e: Exception) -> str:
    """The stage's own error: the last line of the traceback its job wrote to <stage>.log (else the job's)."""
    lines = [x for x in stage_log.read_text().splitlines() if x.strip()] if stage_log.is_file() else []
    return lines[-1].strip() if lines else f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"


def _settle(runner: StudyRunner, state: dict, name: str, outcome: str, jobs: dict, message: str = "") -> None:
    state[name] = outcome
    if outcome == "failed":
        runner.record["failed"][name] = message
        print(f"[fail] {name}: {message}", flush=True)
    else:
        runner.record[outcome].append(name)
    if outcome == "not_run" and name in jobs:  # SLURM holds it for an input that failed: cancel it
        jobs[name].cancel(check=False)
