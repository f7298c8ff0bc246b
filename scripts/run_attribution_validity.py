"""The runs behind results/attribution_validity.md (issues 12 and 23) on CPU, resumable; the lanes, the models they
need first and the settings: safety_units.experiments.validity.plan.

    python scripts/run_attribution_validity.py                  # every lane (maps, evals and regen side by side)
    python scripts/run_attribution_validity.py --lanes report   # only rebuild the report from results/ (no logs/)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from safety_units.experiments.validity.plan import LANES, Harness, Settings
from safety_units.utils.errors import friendly_errors

ROOT = Path(__file__).resolve().parents[1]


@friendly_errors
def main(argv: list[str] | None = None) -> Path | None:
    d = Settings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lanes", nargs="+", choices=LANES, default=list(LANES), help="e.g. maps: (re)start one lane")
    ap.add_argument("--aligned", type=Path, default=d.aligned, help="the aligned model to ablate")
    ap.add_argument("--planted", type=Path, default=d.planted, help="the model trained on a planted 2%% set only")
    ap.add_argument("--work-dir", type=Path, default=d.work, help="unit maps, runs and logs")
    ap.add_argument("--results", type=Path, default=d.results, help="the report's folder (the report: <it>.md)")
    ap.add_argument("--calibration", nargs="+", default=d.calibration, help="attribute.py calibration overrides")
    ap.add_argument("--dose-eval", nargs="*", default=d.dose_eval, help="evaluate.py overrides of the dose sweeps")
    ap.add_argument("--short-eval", nargs="*", default=d.short_eval,
                    help="evaluate.py overrides of the head sweeps and reached masks (ASR, perplexity)")
    ap.add_argument("--sparsity", nargs="+", default=d.sparsity, help="the mask's sparsity_weight sweep (2.0: main)")
    ap.add_argument("--head-shares", nargs="+", default=d.head_shares, help="the head sweeps' shares")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the plan's paths are relative to the repository, and so are those the report names
    settings = Settings(args.aligned, args.planted, args.work_dir, args.results, args.calibration, args.dose_eval,
                        args.short_eval, args.sparsity, args.head_shares)
    out = Harness(settings).run(args.lanes)
    if out is not None:
        print(f"wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
