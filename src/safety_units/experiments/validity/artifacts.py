"""The small inputs of the attribution-validity report's planted, stability, sparsity and cost tables, shipped in
results/ so that the report rebuilds without the unit maps (which stay in logs/).

    planted.json    the planted set S (unit indices per group), the planted model's eval, and each scorer's top-|S|
                    units of that model per ranking -- precision and recall are computed from these sets
    stability.json  per comparison: its maps (label -> path) and pair_metrics of every pair
    sparsity.json   per sparsity weight of scoring=mask: the mask the optimiser reached (units per kind, share,
                    final loss terms, settings); the evaluate.py runs of those masks sit in runs/sparsity/
    cost.json       benchmarks/scorers.py --json, copied
    model_run.json  how the ablated model was trained (the run's overrides and exported config's scale)
    runs/retrain_check  an unablated eval of the ablated model, when it was retrained: compared with the shipped
                    baseline that the shared random controls were measured against

`extract` writes them from the maps and runs (scripts/validity_artifacts.py); the `*_table` functions rebuild the
report's tables from them (scripts/attribution_validity.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from safety_units.evaluation.compare import paired_difference
from safety_units.utils.errors import ConfigError
from safety_units.units.stability import load_planted, planted_tops, recovery, recovery_table, stability_pairs
from safety_units.units.unit_map import Selection, UnitMap, load_selection, selection_size

HARMFUL, PPL = "harmful", "ppl"


def pairs(items: list[str], flag: str) -> dict[str, Path]:
    """name=path items of a command line (`flag` names the option in errors), each path checked."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} takes name=path, got {item!r}.")
        if not Path(path).exists():
            raise ConfigError(f"{flag} {item}: {path} does not exist.")
        out[name] = Path(path)
    return out


def selection_json(sel: Selection) -> dict:
    """{"sizes": {key: units}, "units": {key: [indices]}} -- a selection as small JSON."""
    return {"sizes": {k: int(v.numel()) for k, v in sel.items()},
            "units": {k: [int(i) for i in torch.nonzero(v).flatten()] for k, v in sel.items()}}


def selection_from_json(d: dict) -> Selection:
    out = {}
    for k, n in d["sizes"].items():
        out[k] = torch.zeros(int(n), dtype=torch.bool)
        out[k][torch.tensor(d["units"].get(k, []), dtype=torch.long)] = True
    return out


def _copy_runs(src: Path, dst: Path) -> None:
    """eval.json and eval_meta.json of an evaluate.py run dir."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("eval.json", "eval_meta.json"):
        if not (src / name).is_file():
            raise ConfigError(f"{src / name} does not exist: the run is not finished.")
        shutil.copyfile(src / name, dst / name)


def model_run_record(run: Path) -> dict:
    """How a model was trained: the run's command-line overrides and the scale of its exported config."""
    from omegaconf import OmegaConf

    rec: dict = {"run": str(run)}
    ov = run / ".hydra" / "overrides.yaml"
    if ov.is_file():
        rec["overrides"] = [line[2:] for line in ov.read_text().splitlines()]
    exported = run / "model" / "safety_units_config.yaml"
    if exported.is_file():
        c = OmegaConf.load(exported)
        rec.update(freeze=c.freeze.strategy, num_samples=c.data.num_samples, max_length=c.data.max_length,
                   batch_size=c.data.batch_size, lr=c.optim.lr, max_epochs=c.trainer.max_epochs,
                   sources={n: s.get("weight", 1) for n, s in c.data.sources.items()})
    return rec


def training_scale(rec: dict) -> str:
    out = ""
    if "overrides" in rec:
        out += f", trained by `python train.py {' '.join(rec['overrides'])}`"
    if "freeze" in rec:
        sources = ", ".join(f"{n} (weight {w})" for n, w in rec["sources"].items())
        out += (f" (freeze={rec['freeze']}: {rec['num_samples']} examples of {sources}, max length "
                f"{rec['max_length']}, batch {rec['batch_size']}, lr {rec['lr']}, {rec['max_epochs']} epoch(s))")
    return out


def retrain_check(run: Path, base: dict) -> str:
    """One sentence: does the retrained model's unablated eval (run) match the shipped baseline (base: task ->
    result) on every prompt? The shared random controls were measured on the model of the baseline."""
    ev = json.loads((run / "eval.json").read_text())
    parts = []
    for task, r in ev.items():
        b = base.get(task)
        if b is None:
            continue
        same_prompts = r["extra"].get("prompt_hash") == b["extra"].get("prompt_hash")
        if r["metric"] == "ppl" or r["extra"].get("outcomes") != b["extra"].get("outcomes"):
            rel = abs(r["value"] / b["value"] - 1) if b["value"] else float("nan")
            parts.append(f"{task} {r['value']:.6g} vs {b['value']:.6g} (relative difference {rel:.1e})")
        else:
            parts.append(f"{task}: the same outcome on every prompt" + ("" if same_prompts else " (other prompts!)"))
    return ("The model was retrained with the same command for this report; its unablated eval against the shipped "
            "baseline (runs/retrain_check vs runs/controls/base): " + "; ".join(parts))


def extract(out: Path, planted: Path | None = None, planted_eval: Path | None = None,
            planted_maps: dict[str, Path] | None = None, stability: dict[str, dict[str, Path]] | None = None,
            sparsity: dict[str, Path] | None = None, sparsity_evals: Path | None = None,
            cost: Path | None = None, model_run: Path | None = None,
            retrain_eval: Path | None = None) -> list[Path]:
    """Write the JSON files of the module docstring into `out` (results/attribution_validity); returns them."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if model_run is not None:
        written.append(_write(out / "model_run.json", model_run_record(model_run)))
    if retrain_eval is not None:
        _copy_runs(retrain_eval, out / "runs" / "retrain_check")
    if planted is not None:
        sel, meta, path = load_planted(planted)
        maps = {}
        for name, p in (planted_maps or {}).items():
            um = UnitMap.load(p)
            maps[name] = {"path": str(p), "scoring": um.metadata.get("scoring", {}).get("method"),
                          "top": {by: selection_json(s) for by, s in planted_tops(sel, um).items()}}
        record = {"model": str(path.parent), "set": selection_json(sel), "meta": meta, "maps": maps}
        if planted_eval is not None:
            _copy_runs(planted_eval, out / "runs" / "planted_eval")
        written.append(_write(out / "planted.json", record))
    if stability:
        record = {}
        for title, maps in stability.items():
            labels = list(maps)
            record[title] = {"maps": {k: str(v) for k, v in maps.items()},
                             "pairs": stability_pairs([UnitMap.load(p) for p in maps.values()], labels)}
        written.append(_write(out / "stability.json", record))
    if sparsity:
        record = {}
        for weight, p in sparsity.items():
            um = UnitMap.load(p)
            mask = um.metadata.get("mask")
            if not mask:
                raise ConfigError(f"{p} is not a scoring=mask unit map (no `mask` metadata).")
            reached, _ = load_selection(Path(p) / "mask_units.safetensors")
            record[weight] = {"map": str(p), "reached": selection_size(reached), "final": mask["final"],
                              "settings": mask["settings"]}
            if sparsity_evals is not None:
                _copy_runs(Path(sparsity_evals) / f"eval_w{weight}", out / "runs" / "sparsity" / f"w{weight}")
        written.append(_write(out / "sparsity.json", record))
    if cost is not None:
        shutil.copyfile(cost, out / "cost.json")
        written.append(out / "cost.json")
    return written


def _write(path: Path, record: dict) -> Path:
    path.write_text(json.dumps(record, indent=1, default=str))
    return path


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run scripts/validity_artifacts.py (or the harness's artifacts "
                          f"step) first.")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- tables from the artifacts
def planted_summary(artifacts: Path) -> tuple[dict, dict[str, dict], dict | None]:
    """(planted.json, per map its recovery, the planted model's harmful eval row or None)."""
    rec = _read(artifacts / "planted.json")
    planted = selection_from_json(rec["set"])
    recoveries = {name: recovery(planted, {by: selection_from_json(s) for by, s in m["top"].items()})
                  for name, m in rec["maps"].items()}
    ev = artifacts / "runs" / "planted_eval" / "eval.json"
    return rec, recoveries, json.loads(ev.read_text())[HARMFUL] if ev.is_file() else None


def planted_markdown(artifacts: Path) -> tuple[list[str], dict[str, dict]]:
    rec, recoveries, asr = planted_summary(artifacts)
    planted = selection_from_json(rec["set"])
    n, total = sum(int(v.sum()) for v in planted.values()), sum(v.numel() for v in planted.values())
    line = f"Only a seeded random set S of {n} units ({n / total:.1%}) of `{rec['model']}` was trained."
    if asr is not None:
        line += (f" Its ASR on the fixed harmful set is {asr['value']:.3f} [{asr['ci_low']:.3f}, {asr['ci_high']:.3f}] "
                 f"(n = {asr['n']}; the issue asks for <= 0.3: {'met' if asr['value'] <= 0.3 else 'NOT met'}).")
    line += (" Each scorer attributed that model; precision and recall of its top-|S| units against S, computed "
             "from the sets in `planted.json`. `delta` reads the weight change from the shipped model, which is "
             "non-zero on S only: its safety ranking recovers S by construction (a check, not evidence).")
    return [line, "", recovery_table(recoveries)], recoveries


def sparsity_rows(artifacts: Path, base: dict | None) -> list[dict]:
    """Per sparsity weight: the reached mask's size, its ASR and perplexity on the eval prompts, the change vs the
    unablated model (McNemar), from sparsity.json and runs/sparsity/w*/eval.json; `base`: the unablated eval.json."""
    rec = _read(artifacts / "sparsity.json")
    rows = []
    for weight, r in sorted(rec.items(), key=lambda kv: float(kv[0])):
        ev_path = artifacts / "runs" / "sparsity" / f"w{weight}" / "eval.json"
        ev = json.loads(ev_path.read_text()) if ev_path.is_file() else {}
        units = sum(v["units"] for v in r["reached"].values())
        total = sum(v["of"] for v in r["reached"].values())
        h, p = ev.get(HARMFUL), ev.get(PPL)
        change = paired_difference(base[HARMFUL], h, HARMFUL) if base and h else None
        rows.append({"sparsity_weight": float(weight), "units": units, "share": units / total,
                     "per_kind": {k: v["units"] for k, v in r["reached"].items()},
                     "asr": h and h["value"], "asr_ci": h and [h["ci_low"], h["ci_high"]],
                     "asr_change": change and change["diff"], "p": change and change["p_mcnemar"],
                     "ppl_rise": (p["value"] / base[PPL]["value"] - 1) if p and base and base.get(PPL) else None,
                     "final": r["final"]})
    return rows


def sparsity_markdown(rows: list[dict]) -> str:
    out = ["| sparsity_weight | mask reached: units (per kind) | share of units | ASR [95% CI] | change vs "
           "unablated (McNemar p) | ppl rise | refusal log-odds at the end | KL at the end |",
           "|---:|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in r["per_kind"].items())
        asr = "n/a" if r["asr"] is None else f"{r['asr']:.3f} [{r['asr_ci'][0]:.3f}, {r['asr_ci'][1]:.3f}]"
        change = "n/a" if r["asr_change"] is None else f"{r['asr_change']:+.3f} (p={r['p']:.2g})"
        ppl = "n/a" if r["ppl_rise"] is None else f"{r['ppl_rise']:+.1%}"
        lo = r["final"].get("refusal_logodds")
        out.append(f"| {r['sparsity_weight']:g} | {r['units']} ({kinds}) | {r['share']:.3%} | {asr} | {change} | "
                   f"{ppl} | {'n/a' if lo is None else f'{lo:.2f}'} | {r['final'].get('kl', float('nan')):.3f} |")
    return "\n".join(out)


def plot_sparsity(rows: list[dict], top_points: list[tuple[float, float]], base_asr: float | None,
                  path: Path) -> Path:
    """ASR against the share of units zeroed: the masks the optimiser reached (one per sparsity weight) and the
    top-k sets of the default mask's logit ranking (its dose sweep)."""
    from safety_units.utils.plots import plt  # matplotlib only where a plot is drawn

    fig, ax = plt.subplots(figsize=(5.6, 3.9))
    pts = [(r["share"], r["asr"], r["sparsity_weight"]) for r in rows if r["asr"] is not None and r["share"] > 0]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", label="mask reached (removal >= 0.5)")
        for x, y, w in pts:
            ax.annotate(f"w={w:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if top_points:
        ax.plot([p[0] for p in top_points], [p[1] for p in top_points], marker="o",
                label="top-k by removal logit (default weight)")
    if base_asr is not None:
        ax.axhline(base_asr, color="k", linestyle=":", label="unablated")
    ax.set_xscale("log")
    ax.set_xlabel("share of units zeroed")
    ax.set_ylabel("ASR (fixed harmful set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- a second judge
SECOND_JUDGE_DIR = "rejudge_strings"  # runs/<this>/<sweep>/<point>/eval.json: eval=rejudge judge=strings


def second_judge_markdown(artifacts: Path, shares=(0.01, 0.02), seeds=(0, 1, 2)) -> tuple[str, dict]:
    """The top sets' excess ASR over their random sets at `shares`, with the completions re-judged by the strings
    judge (a keyword rule, not the pattern judge that the mask's objective resembles): paired on the same prompts,
    McNemar p against every seed. Reads runs/rejudge_strings/ (the harness's artifacts step writes it)."""
    root = artifacts / "runs" / SECOND_JUDGE_DIR
    if not root.is_dir():
        return "", {}

    def load(*parts) -> dict | None:
        p = root.joinpath(*parts, "eval.json")
        return json.loads(p.read_text())["rejudge"] if p.is_file() else None

    out = ["| scorer | k | ASR top: patterns judge / strings judge | random mean (strings) | excess over random "
           "(strings): mean [min] | max p vs seeds |", "|---|---:|---:|---:|---:|---:|"]
    record = {}
    for sweep in sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("controls")):
        controls = "controls_heads" if sweep.endswith("_heads") else "controls"
        for k in shares:
            top = load(sweep, f"safety_minus_utility_k{k:g}")
            rnd = [r for r in (load(controls, f"random_k{k:g}_s{s}") for s in seeds) if r is not None]
            if top is None or len(rnd) < len(seeds):
                continue
            diffs = [paired_difference(r, top, "rejudge") for r in rnd]
            ev = artifacts / "runs" / sweep / f"safety_minus_utility_k{k:g}" / "eval.json"
            patterns = json.loads(ev.read_text())[HARMFUL]["value"] if ev.is_file() else None
            row = {"asr_top": top["value"], "asr_top_patterns": patterns,
                   "asr_random_mean": sum(r["value"] for r in rnd) / len(rnd),
                   "excess": sum(d["diff"] for d in diffs) / len(diffs), "excess_min": min(d["diff"] for d in diffs),
                   "p_max": max(d["p_mcnemar"] for d in diffs)}
            record.setdefault(sweep, {})[f"{k:g}"] = row
            out.append(f"| {sweep} | {k:.2%} | {'n/a' if patterns is None else f'{patterns:.3f}'} / {row['asr_top']:.3f} | "
                       f"{row['asr_random_mean']:.3f} | {row['excess']:+.3f} [{row['excess_min']:+.3f}] | "
                       f"{row['p_max']:.2g} |")
    same = total = 0
    for src in sorted(root.glob("controls/*/source_eval.json")):  # regenerated completions of shipped controls
        shipped = artifacts / "runs" / "controls" / src.parent.name / "eval.json"
        if shipped.is_file():
            a = json.loads(src.read_text())[HARMFUL]["extra"]["outcomes"]
            b = json.loads(shipped.read_text())[HARMFUL]["extra"]["outcomes"]
            same, total = same + sum(x == y for x, y in zip(a, b)), total + len(b)
    if total:
        out.append(f"\nThe shipped random sets keep no completions, so they were generated again for this check; "
                   f"the pattern judge's verdicts on them equal the shipped ones on {same} of {total} prompts.")
        record["regenerated_controls_agreement"] = [same, total]
    return "\n".join(out), record
