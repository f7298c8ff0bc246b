"""Write the small inputs of results/attribution_validity.md's planted, stability, sparsity and cost tables from the
unit maps and runs in logs/ (safety_units.experiments.validity.artifacts), so that the report rebuilds from results/ alone.

    python scripts/validity_artifacts.py --out results/attribution_validity
        [--planted <planted model dir> --planted-eval <evaluate.py run dir> --planted-map name=<map> ...]
        [--stability "TITLE" label=<map> label=<map> ...] [--stability ...]
        [--sparsity weight=<mask map> ... --sparsity-evals <dir of eval_w<weight> runs>]
        [--cost <benchmarks/scorers.py --json file>] [--model-run <alignment run dir>]
        [--retrain-eval <unablated evaluate.py run of a retrained model>]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.utils.errors import friendly_errors
from safety_units.experiments.validity.artifacts import extract, pairs


@friendly_errors
def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the report's folder (results/attribution_validity)")
    ap.add_argument("--planted", help="planted model dir (with trained_units.safetensors)")
    ap.add_argument("--planted-eval", help="an evaluate.py run dir of the planted model")
    ap.add_argument("--planted-map", nargs="+", default=[], help="name=unit map of the planted model")
    ap.add_argument("--stability", action="append", nargs="+", default=[], metavar="TITLE LABEL=MAP")
    ap.add_argument("--sparsity", nargs="+", default=[], help="sparsity_weight=scoring=mask map of the aligned model")
    ap.add_argument("--sparsity-evals", help="dir with one evaluate.py run per weight: eval_w<weight>")
    ap.add_argument("--cost", help="JSON written by benchmarks/scorers.py --json")
    ap.add_argument("--model-run", help="the alignment run dir of the ablated model (.hydra, model/)")
    ap.add_argument("--retrain-eval", help="an unablated evaluate.py run of a retrained ablated model")
    args = ap.parse_args(argv)
    stability = {title: pairs(items, f"--stability {title!r}") for title, *items in args.stability}
    written = extract(Path(args.out), planted=Path(args.planted) if args.planted else None,
                      planted_eval=Path(args.planted_eval) if args.planted_eval else None,
                      planted_maps=pairs(args.planted_map, "--planted-map"), stability=stability,
                      sparsity=pairs(args.sparsity, "--sparsity"),
                      sparsity_evals=Path(args.sparsity_evals) if args.sparsity_evals else None,
                      cost=Path(args.cost) if args.cost else None,
                      model_run=Path(args.model_run) if args.model_run else None,
                      retrain_eval=Path(args.retrain_eval) if args.retrain_eval else None)
    for p in written:
        print(f"wrote {p}", flush=True)
    return written


if __name__ == "__main__":
    main()
