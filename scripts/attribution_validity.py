"""Write results/attribution_validity.md: do the scorers find causal safety units? (issues 12 and 23; what it reads:
safety_units.experiments.validity.report; the runs: scripts/run_attribution_validity.py)

    python scripts/attribution_validity.py --out results/attribution_validity.md
        --controls-dir <shared baseline + random runs> --sweep wifv=<runs dir> --sweep snip=<runs dir> ...
        [--head-controls-dir <baseline + random runs of head maps> --head-sweep mask_heads=<runs dir> ...]
        [--artifacts results/attribution_validity]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.experiments.validity.artifacts import pairs
from safety_units.experiments.validity.report import write_report
from safety_units.utils.errors import friendly_errors


@friendly_errors
def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the report (.md); figures go to a folder of that name")
    ap.add_argument("--controls-dir", type=Path, required=True)
    ap.add_argument("--sweep", action="append", required=True, help="scorer=runs dir of its dose-response sweep")
    ap.add_argument("--head-controls-dir", type=Path, help="baseline + random runs of the head maps (units.heads=true)")
    ap.add_argument("--head-sweep", action="append", default=[], help="scorer=runs dir of a head map's sweep")
    ap.add_argument("--artifacts", type=Path, help="the folder of planted.json, stability.json, sparsity.json, ...")
    args = ap.parse_args(argv)
    out = write_report(args.out, args.controls_dir, pairs(args.sweep, "--sweep"), args.artifacts,
                       args.head_controls_dir, pairs(args.head_sweep, "--head-sweep"))
    print(f"wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
