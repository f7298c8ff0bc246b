"""Plots of the SSAH study v2 report, drawn from the section data of safety_units.experiments.study.tables (headless).

Every point is a mean over seeds with sd error bars; a missing condition is left out, never drawn at zero."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FREEZE_COLORS = {"none": "#444444", "esu": "#d62728", "esu_cu": "#9467bd", "random": "#1f77b4", "layers": "#2ca02c"}
METHOD_COLORS = {"full": "#444444", "ru_only": "#d62728", "random": "#1f77b4"}


def _xy(c_x: dict, c_y: dict) -> tuple | None:
    if c_x["mean"] is None or c_y["mean"] is None:
        return None
    return c_x["mean"], c_y["mean"], c_x["sd"] or 0.0, c_y["sd"] or 0.0


def _labeled_series(ax, pts: list[tuple[str, tuple]], color: str, label: str) -> None:
    """One series of (name, (x, y, x sd, y sd)) points with error bars, each point annotated with its name."""
    ax.errorbar([p[0] for _, p in pts], [p[1] for _, p in pts], xerr=[p[2] for _, p in pts],
                yerr=[p[3] for _, p in pts], fmt="o", color=color, capsize=3, label=label)
    for name, p in pts:
        ax.annotate(name, (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_a_frontier(a: dict, path: Path) -> Path | None:
    """(a): OKTest refusal vs ASR, one series per alignment method, one point per lr, shipped as reference."""
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = False
    for m, color in METHOD_COLORS.items():
        pts = [(f"lr {r['lr']}", _xy(r["oktest"], r["harmful"])) for r in a["rows"] if r["method"] == m]
        pts = [(lr, p) for lr, p in pts if p is not None]
        if not pts:
            continue
        drawn = True
        _labeled_series(ax, pts, color, m)
    s = a["shipped"]
    if s["oktest"] is not None and s["harmful"] is not None:
        drawn = True
        ax.plot([s["oktest"]], [s["harmful"]], marker="*", markersize=12, color="black", linestyle="",
                label="shipped")
    if not drawn:
        plt.close(fig)
        return None
    return _finish(fig, ax, path, "OKTest refusal rate (over-refusal; lower is better)",
                   "ASR on the harmful set (lower is safer)", "(a) alignment budget: safety vs over-refusal")


def plot_c_utility(c: dict, family: str, path: Path) -> Path | None:
    """(c): the threat's own utility perplexity vs ASR, one series per freeze, one point per threat of `family`."""
    threats = [t for t in c.values() if t["family"] == family]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    drawn = False
    for fr, color in FREEZE_COLORS.items():
        pts = [(t["key"], _xy(t["rows"][fr]["utility"], t["rows"][fr]["asr"])) for t in threats]
        pts = [(k, p) for k, p in pts if p is not None]
        if not pts:
            continue
        drawn = True
        _labeled_series(ax, pts, color, fr)
    if not drawn:
        plt.close(fig)
        return None
    tasks = sorted({t["utility_task"] for t in threats})
    return _finish(fig, ax, path, f"held-out perplexity of the fine-tune's own task ({', '.join(tasks)})",
                   "ASR on the harmful set", f"(c) {family}: safety vs utility per freeze")


def plot_c_strength(c: dict, family: str, path: Path, xlabel: str) -> Path | None:
    """(c): ASR against the threat's strength (mixture share p, AOA epochs), the unattacked reference at 0."""
    threats = sorted((t for t in c.values() if t["family"] == family and t["strength"] is not None),
                     key=lambda t: t["strength"])
    if not threats:
        return None
    ref = threats[0]["reference"]
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = False
    for fr, color in FREEZE_COLORS.items():
        pts = [(t["strength"], t["rows"][fr]["asr"]) for t in threats if t["rows"][fr]["asr"]["mean"] is not None]
        if not pts:
            continue
        drawn = True
        xs, ms, sds = [x for x, _ in pts], [p["mean"] for _, p in pts], [p["sd"] or 0.0 for _, p in pts]
        if ref["asr"] is not None:
            xs, ms, sds = [0, *xs], [ref["asr"], *ms], [0.0, *sds]
        ax.errorbar(xs, ms, yerr=sds, marker="o", color=color, capsize=3, label=fr)
    if ref["asr"] is not None:
        ax.plot([0], [ref["asr"]], marker="*", markersize=12, color="black", linestyle="",
                label=f"reference ({ref['stage']})")
    if not drawn:
        plt.close(fig)
        return None
    return _finish(fig, ax, path, xlabel, "ASR on the harmful set (mean ± sd over seeds)",
                   f"(c) {family}: ASR vs attack strength")


def write_plots(a: dict, c: dict, out: Path) -> dict[str, str]:
    """Every plot of the report into `out`; returns {name: file name} for the plots that had data."""
    out.mkdir(parents=True, exist_ok=True)
    made = {"a_frontier": plot_a_frontier(a, out / "a_frontier.png")}
    for fam in sorted({t["family"] for t in c.values()}):
        made[f"c_asr_vs_utility_{fam}"] = plot_c_utility(c, fam, out / f"c_asr_vs_utility_{fam}.png")
    made["c_asr_vs_p"] = plot_c_strength(c, "harmful_mix", out / "c_asr_vs_p.png",
                                         "share p of harmful examples in the fine-tune (0: the aligned model)")
    made["c_asr_vs_aoa_epochs"] = plot_c_strength(c, "aoa", out / "c_asr_vs_aoa_epochs.png",
                                                  "AOA fine-tuning epochs (0: the aligned model, AOA prompt)")
    return {k: p.name for k, p in made.items() if p is not None}
