"""results/attribution_validity.md: do the scorers find causal safety units? (issues 12 and 23;
scripts/attribution_validity.py is the command line, experiments.validity.plan the runs behind it).

Every number comes from the runs' artifacts in results/: each scorer's dose-response sweep (scripts/dose_response.py
--runs-dir, one per scorer) against the shared baseline and random controls, optionally the head maps' sweeps
against their own controls, and the small JSON files of the artifacts folder (model_run.json, planted.json,
stability.json, sparsity.json, cost.json, runs/planted_eval, runs/sparsity, runs/retrain_check; written from the
unit maps in logs/ by scripts/validity_artifacts.py). The criteria (GOAL, DEFAULT SCORER) are fixed in
safety_units.experiments.validity.criteria. Figures and summary.json go to <out without .md>/ next to the report.
"""

from __future__ import annotations

import json
from pathlib import Path

from safety_units.experiments.validity.artifacts import (planted_markdown, plot_sparsity, retrain_check,
                                                         second_judge_markdown, sparsity_markdown, sparsity_rows,
                                                         training_scale)
from safety_units.experiments.validity.criteria import (DEFAULT_SHARES, GOAL_EXCESS_ASR, GOAL_P, GOAL_PRECISION,
                                                        HARMFUL, MAX_PPL_RISE, PLANTED_RANKING, choose_default,
                                                        cost_table, dose_rows, dose_table, goal_met,
                                                        heads_vs_channels, load_sweep, moonshot_met, plot_curves,
                                                        scorer_summary)
from safety_units.units.stability import pairs_table, plot_heatmaps
from safety_units.utils.errors import ConfigError

NOTES = {  # how a sweep came to be, where that matters for reading it
    "mask_logit": "the same learned mask as `mask` (its optimisation resumed from mask's saved state; identical "
                  "removal logits), ranked by the logit alone (`scoring.utility=none`). Added after mask's first two "
                  "points (0.25%, 0.5%) were in: the safety-minus-utility ranking subtracts an activation score that "
                  "the mask's KL term already accounts for, and the first look (results/mask_preliminary.md) had "
                  "ranked by the logit. It is a second look at the same prompts, not a held-out test.",
}
HALVES = "calibration halves (disjoint prompts): "  # the harness's titles of the per-scorer half comparisons


def slug(text: str) -> str:
    """A file-name-safe form of a title."""
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def read_json(art: Path | None, name: str) -> dict | None:
    """<art>/<name> parsed, or None when there is no artifacts folder or no such file."""
    return json.loads((art / name).read_text()) if art and (art / name).is_file() else None


def intro(first: dict, art: Path | None, base: dict) -> list[str]:
    """The setup paragraph and the criteria."""
    setup = f"Ablated model: `{first['model']}`"
    if (run := read_json(art, "model_run.json")) is not None:
        setup += training_scale(run)
    if art and (art / "runs" / "retrain_check" / "eval.json").is_file():
        setup += ". " + retrain_check(art / "runs" / "retrain_check", first["base"])
    return [setup + f". Refusal judge: {first['judge']}. Unablated ASR on the fixed harmful set: "
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
            f"prompts (see the module docstring).", ""]


def goal_table(goals: dict, decision: dict, precision: dict) -> list[str]:
    """Goal per scorer, and the default scorer."""
    md = ["Goal per scorer (heads included; planted precision: top-|S| by the sweep's ranking, "
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
    return md + ["", f"**Default scorer: {decision['default']}** ({decision['reason']}).", ""]


def artifact_sections(art: Path, rows: dict, base: dict | None, first: dict, figs: Path, extra: dict) -> list[str]:
    """The second judge, the mask's sparsity, stability and cost, from the artifacts folder (`extra` collects what
    summary.json keeps)."""
    md = []
    table, extra["second_judge"] = second_judge_markdown(art)
    if table:
        md += ["## A second judge", "", "The pattern judge reads refusal phrasing, which is what a mask trained "
               "against refusal log-odds could remove without removing the refusal. The same completions "
               "(top sets at 1% and 2%, their random sets), re-judged by the strings judge (`eval=rejudge "
               "judge=strings`; its agreement with human labels: results/judges.md):", "", table, ""]
    if (art / "sparsity.json").is_file():
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
    for title, comp in (read_json(art, "stability.json") or {}).items():
        labels = list(comp["maps"])
        table, matrices = pairs_table(labels, comp["pairs"])
        png = figs / f"stability_{slug(title)}.png"
        plot_heatmaps(matrices, labels, png)
        md += [f"## Stability: {title}", "", "\n".join(f"* {k}: `{v}`" for k, v in comp["maps"].items()), "",
               table, "", f"![stability]({figs.name}/{png.name})", ""]
    if (art / "cost.json").is_file():
        md += ["## Cost", "", cost_table(art / "cost.json"), ""]
    return md


def write_report(out: Path, controls_dir: Path, sweep_dirs: dict[str, Path], artifacts: Path | None = None,
                 head_controls_dir: Path | None = None, head_dirs: dict[str, Path] | None = None) -> Path:
    """The report at `out`, its figures and summary.json in <out without .md>/, from the sweeps (name -> runs dir),
    the head maps' sweeps with their own controls, and the artifacts folder."""
    head_dirs = head_dirs or {}
    figs = out.with_suffix("")
    figs.mkdir(parents=True, exist_ok=True)
    sweeps = {name: load_sweep(path, controls_dir) for name, path in sweep_dirs.items()}
    if head_dirs and not head_controls_dir:
        raise ConfigError("--head-sweep needs --head-controls-dir (the random sets of head maps are their own).")
    head_sweeps = {name: load_sweep(path, head_controls_dir) for name, path in head_dirs.items()}
    rows = {name: dose_rows(s) for name, s in (sweeps | head_sweeps).items()}
    first = next(iter(sweeps.values()))
    base = (first["base"] or {}).get(HARMFUL)
    plot_curves(sweeps, figs / "dose_curves.png")
    if head_sweeps:
        plot_curves(head_sweeps, figs / "dose_curves_heads.png")
    decision = choose_default(sweeps | head_sweeps, rows)
    goals = {name: goal_met(r) for name, r in rows.items()}
    art = artifacts

    md = ["# Do the scorers find causal safety units?", "", *intro(first, art, base),
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
    md += goal_table(goals, decision, precision)
    stab = read_json(art, "stability.json") or {}
    halves = {title.rsplit(": ", 1)[1]: comp["pairs"][0]["metrics"]["top 0.01 s-u IoU"]
              for title, comp in stab.items() if title.startswith(HALVES) and comp["pairs"]}
    md += ["## Per scorer, in one table", "", "From the tables below (IoU: the disjoint calibration halves' top 1% "
           "safety-minus-utility sets, where a scorer has them; n/a: not measured).", "",
           scorer_summary(rows, extra.get("planted", {}), halves, read_json(art, "cost.json")), ""]
    if planted_lines:
        md += ["## Planted units", "", *planted_lines, ""]
    if art:
        md += artifact_sections(art, rows, base, first, figs, extra)
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
    return out
