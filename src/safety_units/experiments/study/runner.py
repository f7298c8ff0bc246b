"""Run the v2 study's stages (safety_units.experiments.study.plan) in one process, or the setup in this one and the rest in
worker processes (run_parallel).

Models stay in memory -- on the GPU when there is one -- between stages: each process loads the shipped and the
aligned model once, and every stage trains or evaluates a fresh deep copy, so a stage costs its own work and not a
process start and a model load (seconds on a GPU, where a study has hundreds of stages).

Each finished stage leaves `<study>/<stage>.stage.json` with the hash of its composed configs. Without --resume
or --force, existing outputs stop the run; with --resume a stage is skipped when its output exists and the hash
still matches, and rerun otherwise. A stage that fails is recorded in study.json and the run goes on (stages that
need its output fail fast after it); a time budget stops starting new stages and leaves them "not run".
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import queue
import re
import signal
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from safety_units.attribution.pipeline import run_attribution
from safety_units.utils.config import compose_config
from safety_units.utils.errors import ConfigError
from safety_units.evaluation.run import run_evaluate
from safety_units.evaluation.suite import prompt_set_texts
from safety_units.models.loading import LoadedModel, load_model, resolve_device
from safety_units.utils.ranks import RankedLogger
from safety_units.experiments.study.plan import ALIGNED, SHIPPED, Scale, Stage, model_overrides, plan
from safety_units.training.fit import fit
from safety_units.defenses.posthoc import update_norm
from safety_units.experiments.study.posthoc import apply_posthoc
from safety_units.experiments.study.process import release_memory, stage_log

log = RankedLogger(__name__)


class StageExists(ConfigError):
    """A stage has outputs and neither --resume nor --force was given: stop before overwriting anything."""


def stage_configs(stage: Stage, study: Path, scale: Scale, extra: list[str]) -> dict[str, DictConfig]:
    """The composed configs of a stage, keyed by entry point (train / evaluate / attribute)."""
    out = str(study / stage.name)
    # the evaluated model, as evaluate.py would load it (recorded in eval_meta.json; the study passes it in memory)
    model = model_overrides(stage.model, scale, str(study))
    parts = {"attribute": stage.attribute, "train": ["~experiment", *stage.train],
             "evaluate": [*([] if stage.kind in ("align", "train_eval") else model), *stage.evaluate]}
    return {entry: _compose(entry, (*overrides, *extra), out)
            for entry, overrides in parts.items() if overrides and overrides != ["~experiment"]}


_COMPOSED: dict[tuple, DictConfig] = {}


def _compose(entry: str, overrides: tuple[str, ...], out: str) -> DictConfig:
    """compose_config, memoised (many stages share an eval config; composing costs ~0.1 s), with the stage's
    output dir set on a copy."""
    key = (entry, overrides)
    if key not in _COMPOSED:
        _COMPOSED[key] = compose_config(entry, [*overrides, "paths.output_dir=."])
    cfg = copy.deepcopy(_COMPOSED[key])
    cfg.paths.output_dir = out
    return cfg


def config_hash(cfgs: dict[str, DictConfig]) -> str:
    """What decides whether a finished stage is kept: its composed configs, less a defense's `tune:` grid (the
    defense benchmark's metadata, not an argument: editing a grid keeps the stages of its other points)."""
    def hashed(cfg: DictConfig) -> DictConfig:
        if "defense" not in cfg or not isinstance(cfg.defense, DictConfig) or "tune" not in cfg.defense:
            return cfg
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            del cfg.defense["tune"]
        return cfg
    text = "\n".join(f"## {k}\n{OmegaConf.to_yaml(hashed(v), resolve=False)}" for k, v in sorted(cfgs.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


MAX_MASTERS = 4  # models a process keeps loaded (the shipped, the aligned, ...): ~0.5 GB each at 135M in fp32


class StudyRunner:
    """Runs a plan; keeps the shipped and the aligned model in memory (the masters are never trained)."""

    def __init__(self, scale: Scale, study: Path, extra: list[str] | None = None, resume: bool = False,
                 force: bool = False, budget_minutes: float | None = None, tag: str = "", plan_fn=plan):
        self.tag = tag  # the worker's prefix on progress lines
        self.plan_fn = plan_fn  # (scale, study dir) -> stages: the study's plan, or the defense benchmark's
        self.scale, self.study, self.extra = scale, Path(study), list(extra or [])
        self.resume, self.force, self.budget = resume, force, budget_minutes
        self.models: dict[str, LoadedModel] = {}
        self.record = {"ran": [], "skipped": [], "not_run": [], "failed": {}}
        self.t0 = time.time()

    # ------------------------------------------------------------------ models
    def master(self, key: str) -> LoadedModel:
        if key not in self.models and len(self.models) >= MAX_MASTERS:  # the oldest goes (a benchmark has dozens)
            self.models.pop(next(iter(self.models)))
            gc.unfreeze()
            release_memory()
        if key not in self.models:
            over = model_overrides(key, self.scale, str(self.study))
            stage = "align" if key == ALIGNED else key
            if key != SHIPPED and not (self.study / stage / "model" / "config.json").is_file():
                raise ConfigError(f"the model {self.study / stage / 'model'} does not exist: stage "
                                  f"{stage!r} has not finished.")
            cfg = compose_config("evaluate", [*over, *self.extra])
            loaded = load_model(cfg.model)
            loaded.model.to(resolve_device(cfg.get("device"))).eval()
            self.models[key] = loaded
            # what lives now (masters, modules, configs) lives as long as the process: keep it out of the full
            # collection release_memory runs after every stage (0.3 s a stage otherwise)
            gc.collect()
            gc.freeze()
        return self.models[key]

    def copy_of(self, key: str) -> LoadedModel:
        m = self.master(key)
        return LoadedModel(copy.deepcopy(m.model), m.tokenizer, m.name)

    # ------------------------------------------------------------------ one stage
    def finished(self, stage: Stage, digest: str) -> bool:
        done = self.study / stage.name / stage.done_file
        if not done.exists() or self.force:
            return False
        stamp = self.study / f"{stage.name}.stage.json"
        recorded = json.loads(stamp.read_text()).get("config_hash") if stamp.is_file() else None
        if not self.resume:
            raise StageExists(f"stage {stage.name} has outputs ({done}); pass --resume to keep finished stages "
                              f"whose config is unchanged, or --force to rerun every stage.")
        if recorded == digest:
            return True
        log.info("[redo] %s: config changed since it ran (hash %s -> %s)", stage.name, recorded, digest)
        return False

    def run_stage(self, stage: Stage) -> str:
        cfgs = stage_configs(stage, self.study, self.scale, self.extra)
        digest = config_hash(cfgs)
        if self.finished(stage, digest):
            print(f"{self.tag}[skip] {stage.name}: finished, config unchanged", flush=True)
            return "skipped"
        self.wait_for(stage)
        print(f"{self.tag}[run ] {stage.name}", flush=True)
        t0 = time.time()
        (self.study / stage.name).mkdir(parents=True, exist_ok=True)
        with stage_log(self.study / f"{stage.name}.log"):
            try:
                train = self.execute(stage, cfgs)
            finally:
                release_memory()
        seconds = time.time() - t0
        if stage.kind != "attribute":
            point = {"name": stage.name, "kind": stage.kind, "model": stage.model, "labels": stage.labels,
                     "train": train, "seconds": seconds}
            (self.study / stage.name / "point.json").write_text(json.dumps(point, indent=2, default=str))
        (self.study / f"{stage.name}.stage.json").write_text(json.dumps(
            {"config_hash": digest, "seconds": seconds, "overrides": {
                "train": stage.train, "evaluate": stage.evaluate, "attribute": stage.attribute}}, indent=2))
        print(f"{self.tag}       {stage.name} done in {seconds:.1f} s", flush=True)
        return "ran"

    def wait_for(self, stage: Stage, poll_s: float = 10.0) -> None:
        """Wait until the files a stage needs exist (written by a stage another worker is running): the queue is in
        plan order, so a producer always started earlier. Gives up (the stage then fails with a clear error) when
        the time budget is spent or after an hour."""
        missing = [f for f in stage.needs if not (self.study / f).exists()]
        t0 = time.time()
        while missing and not self.out_of_budget() and time.time() - t0 < 3600:
            time.sleep(poll_s)
            missing = [f for f in missing if not (self.study / f).exists()]
        if missing:
            log.warning("%s: still missing %s", stage.name, missing)

    def execute(self, stage: Stage, cfgs: dict[str, DictConfig]) -> dict | None:
        if stage.kind == "attribute":
            run_attribution(cfgs["attribute"])
            return None
        if stage.kind == "eval":
            run_evaluate(cfgs["evaluate"], self.copy_of(stage.model))
            return None
        if stage.kind == "posthoc":
            return self.posthoc(stage, cfgs)
        start = self.copy_of(stage.model)
        t0 = time.time()
        summary, model = fit(cfgs["train"], start)
        train_seconds = time.time() - t0
        trained = LoadedModel(model, start.tokenizer, f"{start.name} + {stage.name}")
        drift = update_norm(model, self.master(stage.model).model)
        # the fine-tune's own prompts are counted in the eval (extra.train_overlap), never removed (the sources'
        # prompts are memoised per process: sources.normalized_prompts)
        seen = prompt_set_texts(cfgs["train"].data.sources, where=f"stage {stage.name}: data.sources")
        run_evaluate(cfgs["evaluate"], trained, train_prompts=seen)
        keep = ("global_step", "train_examples", "data_stats", "freeze", "frozen_max_abs_delta", "trainable_changed",
                "defense")
        return {k: summary.get(k) for k in keep} | {"train_seconds": train_seconds, "lr": float(cfgs["train"].optim.lr),
                                                   "epochs": int(cfgs["train"].trainer.max_epochs),
                                                   "delta_norm": drift}

    def posthoc(self, stage: Stage, cfgs: dict[str, DictConfig]) -> dict:
        """A post-hoc defense on the fine-tuned model `stage.model`, its update measured from `stage.reference`
        (W_aligned), then evaluated: it edits the very model SFT's cell evaluated, so the two pair exactly."""
        tuned = self.copy_of(stage.model)
        record = apply_posthoc(cfgs["train"].get("defense"), tuned, self.master(stage.reference).model, stage.name)
        run_evaluate(cfgs["evaluate"], tuned)
        return record

    # ------------------------------------------------------------------ the plan
    def out_of_budget(self) -> bool:
        return self.budget is not None and (time.time() - self.t0) / 60 > self.budget

    def run(self, stages: list[Stage]) -> dict:
        for i, stage in enumerate(stages):
            if self.out_of_budget():
                self.record["not_run"] += [s.name for s in stages[i:]]
                print(f"{self.tag}[stop] time budget of {self.budget} min spent; {len(stages) - i} stages not run "
                      f"(--resume runs them later)", flush=True)
                break
            try:
                self.record["ran" if self.run_stage(stage) == "ran" else "skipped"].append(stage.name)
            except StageExists:
                raise
            except Exception as e:  # noqa: BLE001 -- one failed stage must not lose the others' hours
                self.fail(stage, e)
            self.write_record(stages)
        self.write_record(stages)
        return self.record

    def run_parallel(self, stages: list[Stage], workers: int) -> dict:
        """The setup stages here, one after the other; then the others -- independent of each other, each needing
        only the setup's outputs -- from a shared queue by `workers` processes (one model copy each; the CPU's
        cores split between them). Small models leave a GPU mostly idle between kernel launches, and one torch
        process uses two CPU cores poorly, so on both several stages at once finish sooner."""
        setup = [s for s in stages if s.labels.get("claim") == "setup"]
        rest = [s for s in stages if s.labels.get("claim") != "setup"]
        self.run(setup)
        self.models.clear()  # the workers load their own masters
        gc.unfreeze()  # (frozen when loaded) so that the collection below can free them
        release_memory()
        todo = []
        for stage in rest:  # finished stages are skipped here, and existing outputs stop the run as in run()
            if (self.study / stage.name / stage.done_file).exists() and \
                    self.finished(stage, config_hash(stage_configs(stage, self.study, self.scale, self.extra))):
                self.record["skipped"].append(stage.name)
            else:
                todo.append(stage.name)
        if todo and not self.out_of_budget():
            self.dispatch(todo, workers)
        elif todo:
            self.record["not_run"] += todo
        self.write_record(stages, workers)
        return self.record

    def dispatch(self, names: list[str], workers: int) -> None:
        import multiprocessing as mp
        import os

        ctx = mp.get_context("spawn")  # CUDA cannot be forked; spawn is also what macOS and Windows do
        todo, messages = ctx.Queue(), ctx.Queue()
        for name in names:
            todo.put(name)
        workers = max(1, min(workers, len(names)))
        for _ in range(workers):
            todo.put(None)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // workers)
        print(f"[pool] {len(names)} stages on {workers} worker processes, {threads} CPU thread(s) each", flush=True)
        args = (self.scale, self.study, self.extra, self.resume, self.force, self.budget, self.t0, threads,
                self.plan_fn)
        procs = {k: ctx.Process(target=_worker, args=(k, *args, todo, messages), daemon=True)
                 for k in range(workers)}
        for p in procs.values():
            p.start()
        try:  # SIGTERM (kill, a scheduler's stop) must not orphan the workers: they would go on writing stages
            previous = signal.signal(signal.SIGTERM, _stop)
        except ValueError:  # not the main thread: no handler, the finally below still runs on errors
            previous = None
        try:
            self.collect(procs, names, messages)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            for p in procs.values():  # SIGKILL: Lightning's SIGTERM handler in a worker only sets a flag
                if p.is_alive():
                    p.kill()
                    p.join(timeout=10)

    def collect(self, procs: dict, names: list[str], messages) -> None:
        """Record the workers' messages until every worker has exited (`procs` loses each one that did)."""
        running: dict[int, str] = {}
        while procs:
            try:
                msg = messages.get(timeout=2)
            except queue.Empty:  # look for workers that died without a word (killed: out of memory)
                for k, p in list(procs.items()):
                    if not p.is_alive() and messages.empty():
                        if k in running:
                            self.record["failed"][running.pop(k)] = f"worker {k} died (exit code {p.exitcode})"
                        procs.pop(k)
                continue
            kind, k, name = msg[:3]
            if kind == "start":
                running[k] = name
            elif kind == "exit":
                procs.pop(k).join()
            else:
                running.pop(k, None)
                if kind == "failed":
                    self.record["failed"][name] = msg[3]
                else:
                    self.record[kind].append(name)
        for name in names:  # stages never started: a dead worker's share, or the budget
            if not any(name in self.record[key] for key in ("ran", "skipped", "not_run", "failed")):
                self.record["not_run"].append(name)

    def fail(self, stage: Stage, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        self.record["failed"][stage.name] = msg
        self.study.mkdir(parents=True, exist_ok=True)
        with open(self.study / f"{stage.name}.log", "a") as f:
            f.write(traceback.format_exc())
        print(f"{self.tag}[fail] {stage.name}: {msg} (see {self.study / (stage.name + '.log')})", flush=True)

    def write_record(self, stages: list[Stage], workers: int = 1) -> None:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        rec = {"scale": self.scale.name, "hardware": self.scale.hardware, "device": device,
               "minutes": (time.time() - self.t0) / 60, "budget_minutes": self.budget,
               "workers": workers, "planned": [s.name for s in stages], **self.record, "settings": asdict(self.scale),
               "extra_overrides": self.extra}
        self.study.mkdir(parents=True, exist_ok=True)
        (self.study / "study.json").write_text(json.dumps(rec, indent=2))


def select(stages: list[Stage], only: str | None) -> list[Stage]:
    """Stages whose name matches the regular expression `only` (all when None)."""
    if not only:
        return stages
    try:
        pattern = re.compile(only)
    except re.error as e:
        raise ConfigError(f"--only {only!r} is not a regular expression: {e}") from None
    chosen = [s for s in stages if pattern.search(s.name)]
    if not chosen:
        raise ConfigError(f"--only {only!r} matches no stage; `--list` prints them.")
    return chosen


def _stop(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")  # unwinds dispatch(), whose finally stops the workers


def _worker(k: int, scale: Scale, study: Path, extra: list[str], resume: bool, force: bool,
            budget: float | None, t0: float, threads: int, plan_fn, todo, messages) -> None:
    """One worker process of run_parallel: run stage names from `todo` until its None; report on `messages`."""
    import torch

    torch.set_num_threads(threads)
    by_name = {s.name: s for s in plan_fn(scale, str(study))}
    runner = StudyRunner(scale, study, extra, resume, force, budget, tag=f"[w{k}] ", plan_fn=plan_fn)
    runner.t0 = t0  # the budget counts from the start of the whole run
    while (name := todo.get()) is not None:
        if runner.out_of_budget():
            messages.put(("not_run", k, name))
            continue
        messages.put(("start", k, name))
        try:
            messages.put((runner.run_stage(by_name[name]), k, name))
        except Exception as e:  # noqa: BLE001 -- recorded like run()'s failures; the worker takes the next stage
            runner.fail(by_name[name], e)
            messages.put(("failed", k, name, runner.record["failed"][name]))
    messages.put(("exit", k, None))


def run_study(scale: Scale, study: Path, extra: list[str] | None = None, only: str | None = None,
              resume: bool = False, force: bool = False, budget_minutes: float | None = None,
              workers: int = 1, plan_fn=plan) -> dict:
    """Run (part of) the plan of `scale` into `study`, in `workers` processes after the setup stages; returns the
    record also written to study.json. `plan_fn` (scale, study dir) -> stages: the study's plan by default. As
    cluster jobs instead: safety_units.experiments.study.jobs.run_study_jobs."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}.")
    stages = select(plan_fn(scale, str(study)), only)
    runner = StudyRunner(scale, study, extra, resume, force, budget_minutes, plan_fn=plan_fn)
    return runner.run(stages) if workers == 1 else runner.run_parallel(stages, workers)
