"""Write results/attribution_validity.md: do the scorers find causal safety units? (issues 12 and 23)

    python scripts/attribution_validity.py --out results/attribution_validity.md
        --controls-dir <shared baseline + random runs>
        --sweep wifv=<runs dir> --sweep snip=<runs dir> ...         (scripts/dose_response.py --runs-dir, one per scorer)
        [--head-controls-dir <baseline + random runs of head maps> --head-sweep mask_heads=<runs dir> ...]
        [--artifacts results/attribution_validity]   (model_run.json, planted.json, stability.json, sparsity.json,
                                                       cost.json, runs/planted_eval, runs/sparsity, runs/retrain_check)

Every number comes from the runs' artifacts in results/ (scripts/validity_artifacts.py writes the small JSON files
from the unit maps in logs/); the criteria (GOAL, DEFAULT SCORER) are fixed in safety_units.experiments.validity.criteria.
Figures go to <out without .md>/ next to the report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safety_units.experiments.validity.criteria import (DEFAULT_SHARES, GOAL_EXCESS_ASR, GOAL_P, GOAL_PRECISION, HARMFUL,
                                               MAX_PPL_RISE, PLANTED_RANKING, choose_default, cost_table, dose_rows,
                                               dose_table, goal_met, heads_vs_channels, load_sweep, moonshot_met,
                                               plot_curves, scorer_summary)
from safety_units.utils.errors import ConfigError, friendly_errors
from safety_units.units.stability import pairs_table, plot_heatmaps
from safety_units.experiments.validity.artifacts import (pairs, planted_markdown, plot_sparsity, retrain_check,
                                             second_judge_markdown, sparsity_markdown, sparsity_rows, training_scale)


NOTES = {  # how a sweep came to be, where that matters for reading it
    "mask_logit": "the same learned mask as `mask` (its optimisation resumed from mask's saved state; identical "
                  "removal logits), ranked by the logit alone (`scoring.utility=none`). Added after mask's first two "
                  "points (0.25%, 0.5%) were in: the safety-minus-utility ranking subtracts an activation score that "
                  "the mask's KL term already accounts for, and the first look (results/mask_preliminary.md) had "
                  "ranked by the logit. It is a second look at the same prompts, not a held-out test.",
}
HALVES = "calibration halves (disjoint prompts): "  # the harness's titles of the per-scorer half comparisons


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


@friendly_errors
def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the report (.md); figures go to a folder of the same name")
    ap.add_argument("--controls-dir", required=True)
    ap.add_argument("--sweep", action="append", required=True, help="scorer=runs dir of its dose-response sweep")
    ap.add_argument("--head-controls-dir", help="baseline + random runs of the head maps (units.heads=true)")
    ap.add_argument("--head-sweep", action="append", default=[], help="scorer=runs dir of a head map's sweep")
    ap.add_argument("--artifacts", help="the folder of planted.json, stability.json, sparsity.json, cost.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    figs = out.with_suffix("")
    figs.mkdir(parents=True, exist_ok=True)
    controls = Path(args.controls_dir)
    sweep_dirs = pairs(args.sweep, "--sweep")
    sweeps = {name: load_sweep(path, controls) for name, path in sweep_dirs.items()}
    head_dirs = pairs(args.head_sweep, "--head-sweep")
    if head_dirs and not args.head_controls_dir:
        raise ConfigError("--head-sweep needs --head-controls-dir (the random sets of head maps are their own).")
    head_sweeps = {name: load_sweep(path, Path(args.head_controls_dir)) for name, path in head_dirs.items()}
    sweeps_all = sweeps | head_sweeps
    rows = {name: dose_rows(s) for name, s in sweeps_all.items()}
    first = next(iter(sweeps.values()))
    base = (first["base"] or {}).get(HARMFUL)
    plot_curves(sweeps, figs / "dose_curves.png")
    if head_sweeps:
        plot_curves(head_sweeps, figs / "dose_curves_heads.png")
    decision = choose_default(sweeps_all, rows)
    goals = {name: goal_met(r) for name, r in rows.items()}

    md = ["# Do the scorers find causal safety units?", ""]
    setup = f"Ablated model: `{first['model']}`"
    art = Path(args.artifacts) if args.artifacts else None
    if art and (art / "model_run.json").is_file():
        setup += training_scale(json.loads((art / "model_run.json").read_text()))
    if art and (art / "runs" / "retrain_check" / "eval.json").is_file():
        setup += ". " + retrain_check(art / "runs" / "retrain_check", first["base"])
    md += [setup + f". Refusal judge: {first['judge']}. Unablated ASR on the fixed harmful set: "
           f"{base['value']:.3f} [{base['ci_low']:.3f}, {base['ci_high']:.3f}] (n = {base['n']}; the issue asks for "
           f"<= 0.2: {'met' if base['value'] <= 0.2 else 'NOT met'}).", "",
           f"Each scorer's unit map ranks units by safety-minus-utility percentile rank; at each share k its top "
           f"units of each kind are zeroed, and so are 3 size-matched random sets (shared by all scorers, seeds "
           f"{', '.join(map(str, first['seeds']))}). The per-scorer reports with every paired test are linked below.",
           "", "## Criteria (fixed in `safety_units.experiments.validity.criteria` before the runs)", "",
           f"- **Goal**: at some k <= 2%, mean excess ASR over the random sets >= {GOAL_EXCESS_ASR}, McNemar "
           f"p < {GOAL_P} against every random seed, and perplexity rise <= {MAX_PPL_RISE:.0%} (the ASR part); and "
           f"planted-set precision >= {GOAL_PRECISION} (issue 23's moonshot: both).",
           f"- **Default scorer**: the largest mean excess at k = {', '.join(f'{k:.0%}' for k in DEFAULT_SHARES)} "
           f"(perplexity rise <= {MAX_PPL_RISE:.0%}) replaces wifv only if it beats wifv's top sets on the same "
           f"prompts (see the module docstring).", "",
           "## Dose-response", "", "![dose curves](" + f"{figs.name}/dose_curves.png)", "",
           dose_table({n: r for n, r in rows.items() if n in sweeps}), ""]
    md += [f"- {name}: {NOTES[name]}" for name in NOTES if name in rows] + [""] * any(n in rows for n in NOTES)
    if head_sweeps:
        md += ["### Attention heads as units", "",
               "Maps with `units.heads=true`: the attention units are the 9 heads of each layer (a head's o_proj "
               "columns and q_proj rows; a grouped-query K/V head is zeroed only when its whole group is), MLP units "
               "as above. At share k the top k of the heads and k of the MLP channels are zeroed; their random "
               "sets (same seeds) draw heads, so the heads have their own controls. The head sweeps cover k = "
               f"{', '.join(format(r['k'], '.2%') for r in rows[next(iter(head_sweeps))])} (0.25% and 0.5% of "
               "270 heads both round to one head).", "",
               "![dose curves, heads](" + f"{figs.name}/dose_curves_heads.png)", "",
               dose_table({n: r for n, r in rows.items() if n in head_sweeps}), "", heads_vs_channels(rows), ""]
    extra, planted_lines, precision = {}, None, {}
    if art and (art / "planted.json").is_file():
        planted_lines, extra["planted"] = planted_markdown(art)
        precision = {n: r[PLANTED_RANKING]["precision"] for n, r in extra["planted"].items()}
    md += ["Goal per scorer (heads included; planted precision: top-|S| by the sweep's ranking, "
           f"{PLANTED_RANKING}, on the planted model below; the moonshot needs both parts):", "",
           "| scorer | ASR part met | at k | effect (mean excess ASR at 1% and 2%) | smallest k (any size) with excess "
           f">= {GOAL_EXCESS_ASR} and p < {GOAL_P}: k, ppl rise | planted precision (>= {GOAL_PRECISION}) | "
           "moonshot met |", "|---|---|---|---:|---|---:|---|"]
    for name, g in goals.items():
        e = decision["effects"][name]
        smallest = "none" if g["asr_part_first_k"] is None else \
            f"{g['asr_part_first_k']:.2%}, {g['asr_part_ppl_rise']:+.1%}"
        prec = precision.get(name)
        md.append(f"| {name} | {'yes' if g['met'] else 'no'} | {', '.join(f'{k:.2%}' for k in g['shares']) or '-'} | "
                  f"{'n/a' if e is None else f'{e:+.3f}'} | {smallest} | {'n/a' if prec is None else f'{prec:.3f}'} | "
                  f"{'yes' if moonshot_met(g, prec) else 'no'} |")
    md += ["", f"**Default scorer: {decision['default']}** ({decision['reason']}).", ""]
    stab = json.loads((art / "stability.json").read_text()) if art and (art / "stability.json").is_file() else {}
    halves = {title.rsplit(": ", 1)[1]: comp["pairs"][0]["metrics"]["top 0.01 s-u IoU"]
              for title, comp in stab.items() if title.startswith(HALVES) and comp["pairs"]}
    cost = json.loads((art / "cost.json").read_text()) if art and (art / "cost.json").is_file() else None
    md += ["## Per scorer, in one table", "", "From the tables below (IoU: the disjoint calibration halves' top 1% "
           "safety-minus-utility sets, where a scorer has them; n/a: not measured).", "",
           scorer_summary(rows, extra.get("planted", {}), halves, cost), ""]
    if planted_lines:
        md += ["## Planted units", "", *planted_lines, ""]
    if art:
        table, extra["second_judge"] = second_judge_markdown(art)
        if table:
            md += ["## A second judge", "", "The pattern judge reads refusal phrasing, which is what a mask trained "
                   "against refusal log-odds could remove without removing the refusal. The same completions "
                   "(top sets at 1% and 2%, their random sets), re-judged by the strings judge (`eval=rejudge "
                   "judge=strings`; its agreement with human labels: results/judges.md):", "", table, ""]
    if art and (art / "sparsity.json").is_file():
        srows = sparsity_rows(art, first["base"])
        logit = "mask_logit" if "mask_logit" in rows else "mask"  # the ranking by the removal logit alone
        mask_rows = {r["k"]: r["asr_top"] for r in rows.get(logit, [])}
        plot_sparsity(srows, sorted(mask_rows.items()), base and base["value"], figs / "mask_sparsity.png")
        extra["sparsity"] = srows
        md += ["## The mask's sparsity: its own size against its ASR", "",
               "scoring=mask at each sparsity_weight (the other settings at their defaults): the units whose removal "
               "probability reached >= 0.5 are zeroed together (`ablate.selection=<run>/mask_units.safetensors`) "
               "and evaluated on the same fixed harmful set, never used in training. The other curve: the top-k "
               f"sets of the default mask's removal logit (the `{logit}` sweep).", "",
               sparsity_markdown(srows), "", f"![sparsity]({figs.name}/mask_sparsity.png)", ""]
    if art and (art / "stability.json").is_file():
        for title, comp in json.loads((art / "stability.json").read_text()).items():
            labels = list(comp["maps"])
            table, matrices = pairs_table(labels, comp["pairs"])
            png = figs / f"stability_{_slug(title)}.png"
            plot_heatmaps(matrices, labels, png)
            md += [f"## Stability: {title}", "", "\n".join(f"* {k}: `{v}`" for k, v in comp["maps"].items()), "",
                   table, "", f"![stability]({figs.name}/{png.name})", ""]
    if art and (art / "cost.json").is_file():
        md += ["## Cost", "", cost_table(art / "cost.json"), ""]
    md += ["## Per-scorer sweeps", "", "Every point's eval.json and eval_meta.json (runs), and the report of each sweep "
           "with all paired tests, where scripts/dose_response.py wrote it next to this report:", ""]
    for name, runs in (sweep_dirs | head_dirs).items():
        own = (art or figs) / "dose" / name / "dose_response.md"  # where the harness's dose_response.py wrote it
        md.append(f"* {name}: runs `{runs}`" + (f", [report]({figs.name}/dose/{name}/dose_response.md)"
                                               if own.is_file() else ""))
    md.append("")
    out.write_text("\n".join(md))
    (figs / "summary.json").write_text(json.dumps({"rows": rows, "goal": goals, "default": decision} | extra,
                                                  indent=1, default=str))
    print(f"wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
