"""The dose-response sweep's plan and runs: the points (share k x arm x seed), their `python evaluate.py`
commands and run dirs, run resumably (a point whose eval.json and eval_meta.json exist is not run again)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from safety_units.utils.errors import ConfigError, SafetyUnitsError

SHARES = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
SEEDS = (0, 1, 2)
TOP, UTILITY, RANDOM = "safety_minus_utility", "utility", "random"
ARM_LABELS = {TOP: "top safety-utility", UTILITY: "top utility", RANDOM: "random"}


class RunFailed(SafetyUnitsError):
    """An evaluate.py run of the sweep exited with an error."""


@dataclass(frozen=True)
class Point:
    top: str | None = None  # None: the unablated baseline
    share: float | None = None
    seed: int | None = None

    @property
    def name(self) -> str:
        if self.top is None:
            return "base"
        return f"{self.top}_k{self.share:g}" + (f"_s{self.seed}" if self.top == RANDOM else "")

    def overrides(self, unit_map: str) -> list[str]:
        if self.top is None:
            return []
        out = [f"ablate.unit_map={unit_map}", f"ablate.top={self.top}", f"ablate.share={self.share!r}"]
        return out + ([f"ablate.seed={self.seed}"] if self.top == RANDOM else [])


def plan(shares=SHARES, seeds=SEEDS, arms=(TOP, UTILITY, RANDOM)) -> list[Point]:
    shares, seeds = list(dict.fromkeys(float(s) for s in shares)), list(dict.fromkeys(int(s) for s in seeds))
    bad = [s for s in shares if not 0.0 < s < 1.0]
    if bad or not shares:
        raise ConfigError(f"--shares must be shares of units in (0, 1), got {bad or 'none'}.")
    if len(seeds) < 3:
        raise ConfigError(f"--seeds: the random band needs at least 3 distinct seeds, got {seeds}.")
    unknown = sorted(set(arms) - {TOP, UTILITY, RANDOM})
    if unknown or RANDOM not in arms:
        raise ConfigError(f"--arms must name {RANDOM} and may add {TOP} and {UTILITY}, got {list(arms)}.")
    return [Point()] + [p for k in shares for p in
                        ([Point(TOP, k)] if TOP in arms else []) + ([Point(UTILITY, k)] if UTILITY in arms else [])
                        + [Point(RANDOM, k, s) for s in seeds]]


def point_dir(point: Point, runs_dir: Path, controls_dir: Path | None = None) -> Path:
    """The run dir of a point. The baseline and the random sets depend on the model and k only, not on a map's
    scores, so sweeps of several unit maps of one model can share them in controls_dir."""
    shared = controls_dir is not None and point.top in (None, RANDOM)
    return (controls_dir if shared else runs_dir) / point.name


def command(point: Point, evaluate_py: Path, runs_dir: Path, unit_map: str, eval_name: str,
            model_path: str | None = None, overrides: list[str] | None = None,
            controls_dir: Path | None = None) -> list[str]:
    model = ["model=hf", f"model.path={model_path}"] if model_path else []
    return [sys.executable, str(evaluate_py), *model, f"eval={eval_name}", *(overrides or []),
            *point.overrides(unit_map), f"hydra.run.dir={point_dir(point, runs_dir, controls_dir)}"]


def is_done(run_dir: Path) -> bool:
    return (run_dir / "eval.json").is_file() and (run_dir / "eval_meta.json").is_file()


def run_subprocess(cmd: list[str], log_path: Path) -> int:
    with open(log_path, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False,
                              cwd=Path(cmd[1]).parent).returncode


def run_points(jobs: list[tuple[Point, list[str]]], runs_dir: Path, force: bool = False,
               runner=run_subprocess, controls_dir: Path | None = None) -> list[str]:
    """Run each job whose run dir is not done (all with force); returns the names that ran."""
    ran = []
    for point, cmd in jobs:
        run_dir = point_dir(point, runs_dir, controls_dir)
        if is_done(run_dir) and not force:
            print(f"[skip] {point.name}: done", flush=True)
            continue
        print(f"[run ] {point.name}: {' '.join(cmd[1:])}", flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"{point.name}.log"
        if runner(cmd, log) != 0:
            raise RunFailed(f"evaluate.py failed for point {point.name}; see {log}.")
        ran.append(point.name)
    return ran
