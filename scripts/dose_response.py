"""Dose-response ablation sweep: zero the top-k% units by safety-minus-utility rank, by utility rank, or at random
(safety_units.experiments.dose_response: the points, their resumable evaluate.py runs and the report).

    python scripts/dose_response.py --model <aligned model dir> --unit-map <unit_map.safetensors> --out <dir>
        [--shares 0.0025 0.005 0.01 0.02 0.04 0.08] [--seeds 0 1 2] [--eval dose] [--force] [--report-only]
        [--controls-dir <dir>] [--arms safety_minus_utility utility random]
        [-- <more evaluate.py overrides, e.g. eval.limit=100 trainer=... model=tiny>]

Several unit maps (scorers) of one model: give each the same --controls-dir, where the baseline and the random sets
run once and are shared; --arms random runs only the controls (any map of the model gives the unit counts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.experiments.dose_response.plan import ARM_LABELS, SEEDS, SHARES
from safety_units.experiments.dose_response.sweep import run_sweep
from safety_units.utils.errors import friendly_errors

ROOT = Path(__file__).resolve().parents[1]


@friendly_errors
def main(argv: list[str] | None = None, runner=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the model dir to ablate (model=hf model.path=...); or pass model=... after --")
    ap.add_argument("--unit-map", required=True, help="unit map of that model (unit_map.safetensors or its dir)")
    ap.add_argument("--out", required=True, help="directory for dose_response.md and dose_response.png")
    ap.add_argument("--runs-dir", help="directory of the evaluate.py runs (default: <out>/runs)")
    ap.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="random sets, at least 3")
    ap.add_argument("--controls-dir", help="shared directory of the baseline and random runs (several maps of one "
                                           "model); default: in --runs-dir")
    ap.add_argument("--arms", nargs="+", default=list(ARM_LABELS), help="which arms to run (default: all three)")
    ap.add_argument("--eval", default="dose", help="eval config (conf/eval/<name>.yaml), default: dose")
    ap.add_argument("--force", action="store_true", help="rerun points that are done")
    ap.add_argument("--report-only", action="store_true", help="only build the report from finished points")
    ap.add_argument("overrides", nargs="*", help="evaluate.py overrides, after --")
    args = ap.parse_args(argv)
    path = run_sweep(ROOT / "evaluate.py", args.unit_map, args.out, args.model, args.runs_dir, args.shares,
                     args.seeds, args.controls_dir, args.arms, args.eval, args.overrides, args.force,
                     args.report_only, runner)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
