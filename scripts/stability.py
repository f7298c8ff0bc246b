"""Stability of unit sets between unit maps (safety_units.units.stability).

    python scripts/stability.py <map A> <map B> [<map C> ...] --out <dir> [--top 0.01 0.02] [--labels a b c]

Compares every pair of maps of the same architecture: IoU of their ESU sets, of their RU sets and of their top-k%
safety-minus-utility sets, and Spearman's rank correlation of the raw safety and utility scores. Writes
<dir>/stability.md (one row per pair) and <dir>/stability.png (one heat-map per metric).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.utils.errors import friendly_errors
from safety_units.units.stability import TOP_SHARES, labels_for, load_maps, plot_heatmaps, stability_report


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("maps", nargs="+", help="unit_map.safetensors files or their run dirs")
    ap.add_argument("--out", required=True, help="directory for stability.md and stability.png")
    ap.add_argument("--top", type=float, nargs="+", default=list(TOP_SHARES),
                    help="shares k of the top-k safety-minus-utility sets (default 0.01 0.02)")
    ap.add_argument("--labels", nargs="+", help="a short name per map (default: the map's run dir name)")
    args = ap.parse_args(argv)
    maps = load_maps(args.maps)
    labels = labels_for(args.maps, args.labels)
    table, matrices = stability_report(maps, labels, args.top)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_heatmaps(matrices, labels, out / "stability.png")
    text = ("## Stability of unit sets\n\n" + "\n".join(f"* {lab}: `{p}`" for lab, p in zip(labels, args.maps))
            + "\n\n" + table + "\n\n![stability](stability.png)\n")
    (out / "stability.md").write_text(text)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
