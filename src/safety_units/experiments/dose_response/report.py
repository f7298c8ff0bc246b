"""The dose-response report: every number read from the points' eval.json / eval_meta.json, the random band, the
paired tests, the markdown table and the plot."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from safety_units.evaluation.compare import paired_difference
from safety_units.experiments.dose_response.plan import ARM_LABELS, RANDOM, TOP, UTILITY, Point, is_done, point_dir
from safety_units.utils.errors import ConfigError


# --------------------------------------------------------------------------- artifacts
def load_point(point: Point, run_dir: Path) -> tuple[dict, dict]:
    """(eval.json, eval_meta.json) of a finished point, checked against what the point should have zeroed."""
    results = json.loads((run_dir / "eval.json").read_text())
    meta = json.loads((run_dir / "eval_meta.json").read_text())
    ab = meta.get("ablation")
    if point.top is None:
        ok = ab is None
    else:
        ok = (ab is not None and ab.get("top") == point.top and math.isclose(ab.get("share") or -1, point.share)
              and (point.top != RANDOM or ab.get("seed") == point.seed))
    if not ok:
        raise ConfigError(f"{run_dir}/eval_meta.json records ablation {ab}, not point {point.name}: a run dir of "
                          f"another sweep? Remove it or choose another --runs-dir.")
    return results, meta


def _same(found: dict, what: str, get) -> str:
    values = {str(get(meta)) for _, meta in found.values()}
    if len(values) > 1:
        raise ConfigError(f"the sweep's runs differ in {what}: {sorted(values)}; points of one sweep must share it.")
    return values.pop()


def _cell(r: dict | None) -> str:
    return "n/a" if r is None else f"{r['value']:.4f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def _band(values: list[float]) -> dict | None:
    if not values:
        return None
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values), "n": len(values)}


def _paired_cell(a: dict | None, b: dict | None, task: str) -> str:
    """b - a on the same prompts, as one table cell."""
    if a is None or b is None:
        return "n/a"
    d = paired_difference(a, b, task)
    p = "n/a" if d["p_mcnemar"] is None else f"{d['p_mcnemar']:.3g}"
    return f"{d['diff']:+.4f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] p={p}"


def _check_size_matched(found: dict) -> None:
    """Every arm at one share zeroes as many units of each kind (random sets are compared at their own size)."""
    for k in {p.share for p in found if p.top is not None}:
        counts = {p.name: {kind: u["units"] for kind, u in found[p][1]["ablation"]["units"].items()}
                  for p in found if p.share == k}
        if len({str(sorted(c.items())) for c in counts.values()}) > 1:
            raise ConfigError(f"the points at k={k:g} zero different numbers of units ({counts}): the shared "
                              f"controls are of a model with other units?")


def summarise(runs_dir: Path, points: list[Point], controls_dir: Path | None = None) -> dict:
    """Everything the report shows, from the runs' artifacts: per task and share, each arm's result and band."""
    dirs = {p: point_dir(p, runs_dir, controls_dir) for p in points}
    found = {p: load_point(p, d) for p, d in dirs.items() if is_done(d)}
    if not found:
        raise ConfigError(f"no finished point under {runs_dir}: run the sweep first (without --report-only).")
    _check_size_matched(found)
    scored = {p: v for p, v in found.items() if p.top in (TOP, UTILITY)}  # random sets ignore the map's scores
    info = {"model": _same(found, "the evaluated model", lambda m: m.get("model_path") or m.get("model")),
            "judge": _same(found, "the refusal judge", lambda m: m.get("judge")),
            "unit_map": _same(scored, "unit map", lambda m: m["ablation"]["unit_map"]) if scored else None,
            "normalization": _same(scored, "rank normalisation", lambda m: m["ablation"].get("normalization"))
            if scored else None,
            "missing": [p for p in points if p not in found]}
    tasks = list(dict.fromkeys(t for results, _ in found.values() for t in results))
    metrics = {t: next(res[t]["metric"] for res, _ in found.values() if t in res) for t in tasks}
    shares = sorted({p.share for p in points if p.top is not None})
    seeds = sorted({p.seed for p in points if p.top == RANDOM})
    base = found.get(Point(), (None, None))[0]
    rows = {}
    for task in tasks:
        for k in shares:
            res = {arm: (found.get(Point(arm, k), (None, None))[0] or {}).get(task) for arm in (TOP, UTILITY)}
            rnd = {s: (found.get(Point(RANDOM, k, s), (None, None))[0] or {}).get(task) for s in seeds}
            metas = [found[p][1]["ablation"] for p in found if p.top is not None and p.share == k]
            rows[task, k] = {**res, "random": rnd, "base": (base or {}).get(task),
                             "band": _band([r["value"] for r in rnd.values() if r is not None]),
                             "units": metas[0]["units"] if metas else None,
                             "share": metas[0]["share"] if metas else None}
    return info | {"tasks": tasks, "metrics": metrics, "shares": shares, "seeds": seeds, "rows": rows, "base": base,
                   "utility_arm": any(p.top == UTILITY for p in points)}


# --------------------------------------------------------------------------- report
def markdown(s: dict, png_name: str = "dose_response.png") -> str:
    out = ["## Dose-response ablation", "",
           f"Model `{s['model']}`, unit map `{s['unit_map']}` ({s['normalization']} percentile ranks), refusal "
           f"judge {s['judge']}. At each share k the round(k x units) units of each kind (MLP, attention) are "
           f"zeroed: those with the highest safety-minus-utility rank (top safety-utility), the highest utility "
           f"rank (top utility), or drawn at random (seeds {', '.join(map(str, s['seeds']))}; band: mean +- sd "
           f"[min, max]). Values: metric [95% CI] from each run's eval.json; k and units zeroed from its "
           f"eval_meta.json.", ""]
    for task in s["tasks"]:
        out += [f"### {task} ({s['metrics'][task]})", "",
                "| k | units zeroed (MLP / attn) | top safety-utility | top utility | random: mean +- sd [min, max] |",
                "|---:|---|---:|---:|---:|",
                f"| 0 (baseline) | 0 | {_cell((s['base'] or {}).get(task))} | | |"]
        utility = _cell if s["utility_arm"] else (lambda r: "not run")
        for k in s["shares"]:
            r = s["rows"][task, k]
            units = "n/a" if r["units"] is None else " / ".join(
                str(r["units"][kind]["units"]) for kind in ("mlp", "attn", "head") if kind in r["units"])
            b = r["band"]
            band = "n/a" if b is None else (f"{b['mean']:.4f} +- {b['sd']:.4f} [{b['min']:.4f}, {b['max']:.4f}]"
                                            + ("" if b["n"] == len(s["seeds"]) else f" ({b['n']} seeds)"))
            share = "n/a" if r["share"] is None else f"{r['share']:.4g}"
            out.append(f"| {share} | {units} | {_cell(r[TOP])} | {utility(r[UTILITY])} | {band} |")
        out.append("")
    out += ["### Paired tests: top safety-utility set vs baseline and vs each random set", "",
            "Change = top safety-utility minus the other run on the same prompts; [paired-bootstrap 95% CI]; "
            "p: exact McNemar test (binary outcomes; n/a for perplexity).", ""]
    for task in s["tasks"]:
        heads = ["vs baseline"] + [f"vs random s{x}" for x in s["seeds"]]
        out += [f"**{task}**", "", "| k | " + " | ".join(heads) + " |", "|---:|" + "---|" * len(heads)]
        for k in s["shares"]:
            r = s["rows"][task, k]
            cells = [_paired_cell(r["base"], r[TOP], task)] + [_paired_cell(r["random"][x], r[TOP], task)
                                                                 for x in s["seeds"]]
            out.append(f"| {k:g} | " + " | ".join(cells) + " |")
        out.append("")
    out += [f"![dose response]({png_name})", ""]
    if s["missing"]:
        out += ["**Missing runs** (shown as n/a): " + ", ".join(p.name for p in s["missing"]), ""]
    return "\n".join(out)


def plot(s: dict, path: Path) -> Path:
    from safety_units.utils.plots import plt  # matplotlib only where a plot is drawn

    ncols = min(2, len(s["tasks"]))
    nrows = math.ceil(len(s["tasks"]) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(s["tasks"]):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, s["tasks"]):
        rows = [s["rows"][task, k] for k in s["shares"]]
        for arm, color, dodge in ((TOP, "#d62728", 0.95), (UTILITY, "#1f77b4", 1.05)):  # side by side on log x
            pts = [(k * dodge, r[arm]) for k, r in zip(s["shares"], rows) if r[arm] is not None]
            if pts:
                # clipped at 0: a Wilson bound can sit a rounding error beyond a rate of 0 or 1
                err = [[max(0.0, r["value"] - r["ci_low"]) for _, r in pts],
                       [max(0.0, r["ci_high"] - r["value"]) for _, r in pts]]
                ax.errorbar([k for k, _ in pts], [r["value"] for _, r in pts], yerr=err, capsize=3, marker="o",
                            color=color, label=ARM_LABELS[arm])
        band = [(k, r["band"]) for k, r in zip(s["shares"], rows) if r["band"] is not None]
        if band:
            ks = [k for k, _ in band]
            ax.fill_between(ks, [b["min"] for _, b in band], [b["max"] for _, b in band], color="#999999",
                            alpha=0.35, label="random (min-max)")
            ax.plot(ks, [b["mean"] for _, b in band], color="#555555", linestyle="--", label="random (mean)")
        base = (s["base"] or {}).get(task)
        if base is not None:
            ax.axhline(base["value"], color="k", linestyle=":", label="baseline")
        ax.set_xscale("log")
        if s["metrics"][task] == "ppl":  # a destroyed model's perplexity is orders of magnitude off the rest
            ax.set_yscale("log")
        ax.set_xticks(s["shares"], [f"{k:.2%}" for k in s["shares"]], rotation=45, fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("share of units zeroed (per kind)")
        ax.set_ylabel(s["metrics"][task])
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs_dir: Path, points: list[Point], out_dir: Path, controls_dir: Path | None = None) -> Path:
    s = summarise(runs_dir, points, controls_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(s, out_dir / "dose_response.png")
    path = out_dir / "dose_response.md"
    path.write_text(markdown(s))
    return path
