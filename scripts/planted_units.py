"""How well do unit maps recover a planted unit set?

    python scripts/planted_units.py <planted model dir> <unit map> [<unit map> ...] [--labels a b] [--out report.md]

The planted model is a `python train.py freeze=train_only freeze.random_share=0.02 freeze.seed=0 ...` run: only
the units of a seeded random set S trained (everything else is bit-identical), and its exported model/ carries S
as trained_units.safetensors. The maps are attributions of that model (`python attribute.py model=hf
model.path=<run>/model ...`). For each map: precision and recall of its top-|S| units (per unit kind) by safety
rank and by safety-minus-utility rank against S (safety_units.units.stability.planted_recovery).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.utils.errors import friendly_errors
from safety_units.units.stability import labels_for, load_planted, planted_table
from safety_units.units.unit_map import UnitMap


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("planted", help="the planted model dir (with trained_units.safetensors), or that file")
    ap.add_argument("maps", nargs="+", help="unit maps of the planted model")
    ap.add_argument("--labels", nargs="+", help="a short name per map (default: the map's run dir name)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    planted, meta, path = load_planted(args.planted)
    maps = [UnitMap.load(m) for m in args.maps]
    how = (f"random share {meta['random_share']} of each kind's units, seed {meta['seed']}"
           if meta.get("random_share") is not None else f"classes {meta.get('classes')} of {meta.get('unit_map')}")
    text = (f"Planted set S: `{path}` ({how}). Top-|S| per unit kind, ranks as the classifier uses them; "
            f"precision = recall because the top set is as large as S; chance = |S| / units.\n\n"
            + planted_table(planted, maps, labels_for(args.maps, args.labels)) + "\n")
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
