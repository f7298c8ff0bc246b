"""Run the v2 study's stages (safety_units.study_plan) in one process.

Models stay in memory -- on the GPU when there is one -- between stages: the shipped and the aligned model are
loaded once, and every stage trains or evaluates a fresh deep copy, so a stage costs its own work and not a
process start and a model load (seconds on a GPU, where a study has hundreds of stages).

Each finished stage leaves `<study>/<stage>.stage.json` with the hash of its composed configs. Without --resume
or --force, existing outputs stop the run; with --resume a stage is skipped when its output exists and the hash
still matches, and rerun otherwise. A stage that fails is recorded in study.json and the run goes on (stages that
need its output fail fast after it); a time budget stops starting new stages and leaves them "not run".
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safety_units.config import compose_config
from safety_units.errors import ConfigError
from safety_units.models import LoadedModel
from safety_units.study_plan import ALIGNED, Scale, Stage, model_overrides, plan

log = logging.getLogger(__name__)


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
    text = "\n".join(f"## {k}\n{OmegaConf.to_yaml(v, resolve=False)}" for k, v in sorted(cfgs.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def release_memory() -> None:
    """Free the stage's model copy, optimizer state and activations now, and hand the freed heap back to the OS:
    without it a process running dozens of stages grew past 12 GB on CPU (allocator fragmentation) and was killed."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


@contextmanager
def stage_log(path: Path):
    """Log records of the stage also go to <study>/<stage>.log."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


class StudyRunner:
    """Runs a plan; keeps the shipped and the aligned model in memory (the masters are never trained)."""

    def __init__(self, scale: Scale, study: Path, extra: list[str] | None = None, resume: bool = False,
                 force: bool = False, budget_minutes: float | None = None):
        self.scale, self.study, self.extra = scale, Path(study), list(extra or [])
        self.resume, self.force, self.budget = resume, force, budget_minutes
        self.models: dict[str, LoadedModel] = {}
        self.record = {"ran": [], "skipped": [], "not_run": [], "failed": {}}
        self.t0 = time.time()

    # ------------------------------------------------------------------ models
    def master(self, key: str) -> LoadedModel:
        if key not in self.models:
            from safety_units.models import load_model, resolve_device

            over = model_overrides(key, self.scale, str(self.study))
            if key == ALIGNED and not (self.study / "align" / "model" / "config.json").is_file():
                raise ConfigError(f"the aligned model {self.study / 'align' / 'model'} does not exist: stage "
                                  f"'align' has not finished.")
            cfg = compose_config("evaluate", [*over, *self.extra])
            loaded = load_model(cfg.model)
            loaded.model.to(resolve_device(cfg.get("device"))).eval()
            self.models[key] = loaded
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
            print(f"[skip] {stage.name}: finished, config unchanged", flush=True)
            return "skipped"
        print(f"[run ] {stage.name}", flush=True)
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
        print(f"       done in {seconds:.1f} s", flush=True)
        return "ran"

    def execute(self, stage: Stage, cfgs: dict[str, DictConfig]) -> dict | None:
        from safety_units.evaluate_run import run_evaluate

        if stage.kind == "attribute":
            from safety_units.attribution import run_attribution

            run_attribution(cfgs["attribute"])
            return None
        if stage.kind == "eval":
            run_evaluate(cfgs["evaluate"], self.copy_of(stage.model))
            return None
        from safety_units.evaluation import prompt_set_texts
        from safety_units.training import fit

        start = self.copy_of(stage.model)
        summary, model = fit(cfgs["train"], start)
        trained = LoadedModel(model, start.tokenizer, f"{start.name} + {stage.name}")
        # the fine-tune's own prompts are counted in the eval (extra.train_overlap), never removed
        seen = prompt_set_texts(cfgs["train"].data.sources, where=f"stage {stage.name}: data.sources")
        run_evaluate(cfgs["evaluate"], trained, train_prompts=seen)
        keep = ("global_step", "train_examples", "data_stats", "freeze", "frozen_max_abs_delta", "trainable_changed")
        return {k: summary.get(k) for k in keep} | {"lr": float(cfgs["train"].optim.lr),
                                                   "epochs": int(cfgs["train"].trainer.max_epochs)}

    # ------------------------------------------------------------------ the plan
    def run(self, stages: list[Stage]) -> dict:
        for i, stage in enumerate(stages):
            if self.budget is not None and (time.time() - self.t0) / 60 > self.budget:
                self.record["not_run"] += [s.name for s in stages[i:]]
                print(f"[stop] time budget of {self.budget} min spent; {len(stages) - i} stages not run "
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

    def fail(self, stage: Stage, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        self.record["failed"][stage.name] = msg
        self.study.mkdir(parents=True, exist_ok=True)
        with open(self.study / f"{stage.name}.log", "a") as f:
            f.write(traceback.format_exc())
        print(f"[fail] {stage.name}: {msg} (see {self.study / (stage.name + '.log')})", flush=True)

    def write_record(self, stages: list[Stage]) -> None:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        rec = {"scale": self.scale.name, "hardware": self.scale.hardware, "device": device,
               "minutes": (time.time() - self.t0) / 60, "budget_minutes": self.budget,
               "planned": [s.name for s in stages], **self.record, "settings": asdict(self.scale),
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


def run_study(scale: Scale, study: Path, extra: list[str] | None = None, only: str | None = None,
              resume: bool = False, force: bool = False, budget_minutes: float | None = None) -> dict:
    """Run (part of) the plan of `scale` into `study`; returns the record also written to study.json."""
    stages = select(plan(scale, str(study)), only)
    return StudyRunner(scale, study, extra, resume, force, budget_minutes).run(stages)
