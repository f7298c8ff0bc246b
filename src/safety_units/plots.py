"""Plots written next to results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CLASS_COLORS = {"esu": "#d62728", "cu": "#9467bd", "euu": "#1f77b4", "ru": "#bbbbbb"}


def plot_units_per_layer(unit_map, path: str | Path, title: str | None = None) -> Path:
    counts = unit_map.counts()
    kinds = [k for k in ("mlp", "attn") if any(key.startswith(k + ".") for key in counts)]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 3.2 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        keys = sorted((k for k in counts if k.startswith(kind + ".")), key=lambda k: int(k.split(".")[1]))
        layers = [int(k.split(".")[1]) for k in keys]
        bottom = [0.0] * len(keys)
        for cls in ("esu", "cu", "euu", "ru"):
            share = [counts[k][cls] / counts[k]["total"] for k in keys]
            ax.bar(layers, share, bottom=bottom, color=CLASS_COLORS[cls], label=cls.upper(), width=0.85)
            bottom = [b + s for b, s in zip(bottom, share)]
        ax.set_ylabel(f"{kind.upper()} units (share)")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper right", ncol=4, fontsize=8)
    fig.suptitle(title or "unit classes per layer")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(rows: list[dict], path: str | Path, x: str, y: str, xlabel: str, ylabel: str,
                  title: str) -> Path:
    """Scatter of one metric against another, one numbered point (with error bars if given) per condition.

    Numbers, not text, sit at the points (conditions often land on top of each other); the legend names them.
    """
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for i, r in enumerate(rows, 1):
        ax.errorbar(r[x], r[y], xerr=r.get(f"{x}_err"), yerr=r.get(f"{y}_err"), fmt="o", capsize=3,
                    label=f"{i}: {r['label']}")
        ax.annotate(str(i), (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
