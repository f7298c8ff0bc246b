"""One dose-response sweep end to end (scripts/dose_response.py is the command line): check the inputs, run the
points that are not done (or all, with `force`), then write the report from the runs' artifacts."""

from __future__ import annotations

from pathlib import Path

from safety_units.experiments.dose_response.plan import (ARM_LABELS, SEEDS, SHARES, command, plan, run_points,
                                                         run_subprocess)
from safety_units.experiments.dose_response.report import write_report
from safety_units.utils.errors import ConfigError


def run_sweep(evaluate_py: Path, unit_map: str, out: str, model: str | None = None, runs_dir: str | None = None,
              shares=SHARES, seeds=SEEDS, controls_dir: str | None = None, arms=tuple(ARM_LABELS),
              eval_name: str = "dose", overrides: list[str] | None = None, force: bool = False,
              report_only: bool = False, runner=None) -> Path:
    """Sweep `unit_map` of `model` (or the model=... in `overrides`) into <runs_dir> (default <out>/runs), the
    baseline and random sets into `controls_dir` when given (shared by several maps of one model); returns the
    report's path. `runner(cmd, log) -> exit status` runs a point (default: a subprocess)."""
    unit_map_path = Path(unit_map).resolve()
    if not unit_map_path.exists():
        raise ConfigError(f"--unit-map {unit_map} does not exist.")
    model_dir = str(Path(model).resolve()) if model else None
    if model_dir and not Path(model_dir).is_dir():
        raise ConfigError(f"--model {model} is not a model directory.")
    out_dir = Path(out).resolve()
    runs = Path(runs_dir).resolve() if runs_dir else out_dir / "runs"
    controls = Path(controls_dir).resolve() if controls_dir else None
    points = plan(shares, seeds, arms)
    if not report_only:
        jobs = [(p, command(p, evaluate_py, runs, str(unit_map_path), eval_name, model_dir, overrides, controls))
                for p in points]
        run_points(jobs, runs, force, runner or run_subprocess, controls)
    return write_report(runs, points, out_dir, controls)
