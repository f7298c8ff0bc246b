"""Stability of unit sets across unit maps, and recovery of a planted unit set.

    python scripts/stability.py <map A> <map B> [<map C> ...] --out <dir> [--top 0.01 0.02] [--labels a b c]

compares every pair of maps -- of the same architecture (unit counts per layer must agree; the weights may differ,
e.g. the shipped vs the aligned model, or two calibration sets): IoU of their ESU sets, of their RU sets and of
their top-k% units by safety-minus-utility rank (per unit kind, `UnitMap.top`), and Spearman's rank correlation
of the raw safety scores and of the raw utility scores over all units (both kinds pooled). Writes stability.md
(one row per pair) and stability.png (one heat-map per metric).

`planted_recovery(planted, map)`: with a model trained on a known unit set S only (freeze=train_only, S exported as
`trained_units.safetensors`), the precision and recall of the map's top-|S| units by safety rank and by
safety-minus-utility rank against S (scripts/planted_units.py).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch

from safety_units.units.classification import percentile_ranks
from safety_units.utils.errors import ConfigError
from safety_units.units.unit_map import Selection, UnitMap, load_selection, share_counts

TOP_SHARES = (0.01, 0.02)


def check_same_units(sizes: dict[str, int], other: dict[str, int], what: str, other_what: str) -> None:
    """Unit counts per layer must agree (weights may differ); ConfigError naming both otherwise."""
    if sizes != other:
        diff = sorted(k for k in set(sizes) | set(other) if sizes.get(k) != other.get(k))[:4]
        detail = ", ".join(f"{k}: {sizes.get(k)} vs {other.get(k)}" for k in diff)
        raise ConfigError(f"{what} and {other_what} cover different units ({detail}); unit sets can only be "
                          f"compared between maps of the same architecture.")


def load_maps(paths: list[str]) -> list[UnitMap]:
    if len(paths) < 2:
        raise ConfigError("give at least two unit maps to compare.")
    maps = [UnitMap.load(p) for p in paths]
    for p, um in zip(paths[1:], maps[1:]):
        check_same_units(maps[0].sizes(), um.sizes(), paths[0], p)
    return maps


def iou(a: Selection, b: Selection) -> float:
    """|A & B| / |A | B| over all units (nan when both are empty)."""
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / union if union else float("nan")


def spearman(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Spearman's rho of two score dicts over all units: Pearson correlation of average ranks (ties share one)."""
    keys = sorted(a)
    x = percentile_ranks(torch.cat([a[k].double().flatten() for k in keys])).numpy()
    y = percentile_ranks(torch.cat([b[k].double().flatten() for k in keys])).numpy()
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / denom if denom else float("nan")


def pair_metrics(a: UnitMap, b: UnitMap, tops=TOP_SHARES) -> dict[str, float]:
    out = {"ESU IoU": iou(a.select("esu"), b.select("esu")), "RU IoU": iou(a.select("ru"), b.select("ru"))}
    for k in tops:
        counts = share_counts(a.sizes(), k, "--top")
        out[f"top {k:.4g} s-u IoU"] = iou(a.top("safety_minus_utility", counts), b.top("safety_minus_utility", counts))
    out["rho safety"] = spearman(a.safety, b.safety)
    out["rho utility"] = spearman(a.utility, b.utility)
    return out


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def stability_pairs(maps: list[UnitMap], labels: list[str], tops=TOP_SHARES) -> list[dict]:
    """pair_metrics of every pair of maps: [{"a": label, "b": label, "metrics": {...}}] (JSON-ready)."""
    return [{"a": labels[i], "b": labels[j], "metrics": pair_metrics(maps[i], maps[j], tops)}
            for i, j in itertools.combinations(range(len(maps)), 2)]


def stability_report(maps: list[UnitMap], labels: list[str], tops=TOP_SHARES) -> tuple[str, dict[str, np.ndarray]]:
    """Markdown table (one row per pair) and, per metric, the symmetric matrix over maps (diagonal: 1)."""
    return pairs_table(labels, stability_pairs(maps, labels, tops))


def pairs_table(labels: list[str], pairs: list[dict]) -> tuple[str, dict[str, np.ndarray]]:
    """The table and matrices of stability_report from stability_pairs' records (e.g. read back from JSON)."""
    n, index = len(labels), {label: i for i, label in enumerate(labels)}
    rows, matrices = [], {}
    for pair in pairs:
        i, j, m = index[pair["a"]], index[pair["b"]], pair["metrics"]
        for name, v in m.items():
            matrices.setdefault(name, np.eye(n))[i, j] = v
            matrices[name][j, i] = v
        rows.append(f"| {labels[i]} | {labels[j]} | " + " | ".join(_fmt(v) for v in m.values()) + " |")
    names = list(matrices)
    head = ("| map A | map B | " + " | ".join(names) + " |\n|---|---|" + "---:|" * len(names))
    legend = ("IoU = |A & B| / |A | B| over all units; top k s-u: the k share of each unit kind's units with the "
              "highest safety-minus-utility percentile rank; rho: Spearman rank correlation of the raw scores over "
              "all units.\n\n")
    return legend + "\n".join([head] + rows), matrices


def plot_heatmaps(matrices: dict[str, np.ndarray], labels: list[str], path: str | Path) -> Path:
    from safety_units.utils.plots import plt  # matplotlib only where a plot is drawn

    fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices) + 1, 3.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], matrices.items()):
        ax.imshow(m, vmin=0 if "IoU" in name else -1, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, _fmt(v), ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- planted sets
PLANTED_RANKINGS = ("safety", "safety_minus_utility")


def planted_tops(planted: Selection, um: UnitMap) -> dict[str, Selection]:
    """Per ranking (safety, safety_minus_utility): the map's top-|S| units (|S| taken per unit kind)."""
    check_same_units(um.sizes(), {k: v.numel() for k, v in planted.items()}, "the unit map", "the planted set")
    counts = {kind: sum(int(v.sum()) for k, v in planted.items() if k.startswith(kind + "."))
              for kind in sorted({k.split(".")[0] for k in planted})}
    if not sum(counts.values()):
        raise ConfigError("the planted unit set is empty.")
    return {by: um.top(by, counts) for by in PLANTED_RANKINGS}


def recovery(planted: Selection, tops: dict[str, Selection]) -> dict[str, dict]:
    """Per ranking: hits, precision and recall of a top set against S. The top set is as large as S, so precision
    equals recall; `chance` is the precision a random set of that size has in expectation (|S| / units)."""
    n_planted, n_units = sum(int(v.sum()) for v in planted.values()), sum(v.numel() for v in planted.values())
    out = {}
    for by, top in tops.items():
        hits = sum(int((top[k] & planted[k]).sum()) for k in planted)
        found = sum(int(v.sum()) for v in top.values())
        out[by] = {"hits": hits, "planted": n_planted, "precision": hits / found, "recall": hits / n_planted,
                   "chance": n_planted / n_units}
    return out


def planted_recovery(planted: Selection, um: UnitMap) -> dict[str, dict]:
    """Per ranking (safety, safety_minus_utility): hits, precision and recall of the map's top-|S| units vs S."""
    return recovery(planted, planted_tops(planted, um))


def load_planted(path: str | Path) -> tuple[Selection, dict, Path]:
    """The trained unit set S of a freeze=train_only run: (S, its metadata, the file), from the model/ dir or file."""
    path = Path(path)
    if path.is_dir():
        path = path / "trained_units.safetensors"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: pass the model/ dir of a freeze=train_only run (it exports the "
                          f"trained unit set as trained_units.safetensors).")
    planted, meta = load_selection(path)
    if meta.get("role") != "trained":
        raise ConfigError(f"{path} is not a trained unit set (role {meta.get('role')!r}).")
    return planted, meta, path


def planted_table(planted: Selection, maps: list[UnitMap], labels: list[str]) -> str:
    return recovery_table({label: planted_recovery(planted, um) for label, um in zip(labels, maps)})


def recovery_table(recoveries: dict[str, dict[str, dict]]) -> str:
    """One row per map and ranking, from planted_recovery / recovery results."""
    rows = ["| unit map | ranked by | planted units | hits in top-|S| | precision | recall | chance |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for label, rec in recoveries.items():
        for by, r in rec.items():
            rows.append(f"| {label} | {by} | {r['planted']} | {r['hits']} | {r['precision']:.3f} | "
                        f"{r['recall']:.3f} | {r['chance']:.3f} |")
    return "\n".join(rows)


def labels_for(paths: list[str], labels: list[str] | None) -> list[str]:
    if labels and len(labels) != len(paths):
        raise ConfigError(f"--labels: {len(labels)} labels for {len(paths)} maps.")
    return labels or [Path(p).parent.name if Path(p).suffix else Path(p).name for p in paths]
