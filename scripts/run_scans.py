"""SCANS against refusal-direction ablation and no steering, on aligned models: results/scans.md
(safety_units.experiments.scans.run: the conditions of each model; scans_report: the criteria and the report).

    python scripts/run_scans.py --model aligned=logs/align_quick/model \\
        --model quickstart_ru=logs/quickstart_ru/model --model quickstart_random=logs/quickstart_random/model \\
        --model defense_sft=logs/defenses_smollm2/align_sft_s0/model \\
        --unit-map defense_sft:wifv=logs/defenses_smollm2/attribute_s0/unit_map.safetensors \\
        --unit-map defense_sft:mask=<attribute.py scoring=mask run on that model>/unit_map.safetensors --resume
    python scripts/run_scans.py --report-only          # rebuild results/scans.md from results/scans/cells.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.experiments.scans.report import write_report  # noqa: E402
from safety_units.utils.errors import friendly_errors  # noqa: E402


@friendly_errors
def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                    help="an aligned model (exported run dir/model); the first is the fully aligned one")
    ap.add_argument("--unit-map", action="append", default=[], metavar="MODEL:LABEL=PATH",
                    help="a unit map of that model: the anchored blocks' overlap with its ESU")
    ap.add_argument("--alphas", default="4,8,16,32", help="SCANS multipliers for the first model")
    ap.add_argument("--ablation-on", choices=["all", "first"], default="all",
                    help="refusal_ablation on every model (default) or on the first only (it is the slow condition)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "logs" / "scans")
    ap.add_argument("--resume", action="store_true", help="skip conditions whose settings are unchanged")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="an evaluate.py override for every condition (e.g. eval.tasks.harmful.limit=20); steer.* "
                         "ones go to the steered conditions")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "results")
    ap.add_argument("--report-name", default="scans")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.report_only:
        return print(f"wrote {write_report(args.results_dir, args.report_name)}")
    from safety_units.experiments.scans.run import name_paths, run_scans, unit_maps  # loads torch: not for reports

    models = name_paths(args.model, "--model")
    out = run_scans(models, unit_maps(args.unit_map, models), [float(a) for a in args.alphas.split(",")],
                    args.ablation_on, args.work_dir, args.resume, args.extra, args.results_dir, args.report_name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
