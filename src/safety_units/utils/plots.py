"""Plots written next to results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CLASS_COLORS = {"esu": "#d62728", "cu": "#9467bd", "euu": "#1f77b4", "ru": "#bbbbbb"}


def plot_units_per_layer(unit_map, path: str | Path, title: str | None = None) -> Path:
    counts = unit_map.counts()
    kinds = [k for k in ("mlp", "expert", "attn", "head") if any(key.startswith(k + ".") for key in counts)]
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


def plot_drift(records: list[dict], classes: list[str], path: str | Path, title: str = "unit drift") -> Path:
    """Per-class IoU with the step-0 classes against the step, and the last transition matrix (row shares)."""
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    steps = [r["step"] for r in records]
    for c in classes:
        ious = [r["iou"][c] if r["iou"][c] is not None else float("nan") for r in records]
        ax.plot(steps, ious, marker="o", color=CLASS_COLORS[c], label=c.upper())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("IoU with the step-0 class")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    last = records[-1]
    counts = last["transitions"]
    shares = [[v / max(1, sum(row)) for v in row] for row in counts]
    hm.imshow(shares, vmin=0, vmax=1, cmap="Blues")
    for i, row in enumerate(counts):
        for j, v in enumerate(row):
            hm.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if shares[i][j] > 0.5 else "black")
    labels = [c.upper() for c in classes]
    hm.set_xticks(range(len(classes)), labels)
    hm.set_yticks(range(len(classes)), labels)
    hm.set_xlabel(f"class at step {last['step']}")
    hm.set_ylabel("class at step 0")
    hm.set_title("transitions (units; colour: share of row)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
