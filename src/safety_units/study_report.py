"""The SSAH study's report (results/ssah_smollm2.md), built only from the artifacts of the study's runs.

Numbers come from each run's eval.json / eval_meta.json, settings from the unit maps' metadata (unit_map.json)
and the runs' resolved configs (`model/safety_units_config.yaml` of a train run, `.hydra/config.yaml`
otherwise); the criteria live in safety_units.study_verdicts. A missing run is listed and shown as n/a; with no
evaluation at all there is no report (ConfigError).
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from safety_units.errors import ConfigError
from safety_units.study_verdicts import (
    ABLATED,
    FREEZES,
    MARGIN,
    POOLED,
    ablation_rows,
    paired_table,
    pooled,
    random_runs,
    result,
    value,
    verdicts,
)

COLUMNS = [("ASR all harmful", POOLED), ("ASR AdvBench", "harmful"), ("refusal OKTest", "oktest"),
           ("refusal harmless", "harmless"), ("MMLU acc", "mmlu/acc"), ("ppl", "ppl")]
ALIGN_METHODS = {"none": "full fine-tuning", "ru_only": "RU units only"}


# --------------------------------------------------------------------------- run names
def eval_runs(seeds: list[int], random_seeds: list[int], align_tags: list[str]) -> list[str]:
    return (["eval_shipped"] + [f"eval_align_{m}{t}" for t in align_tags for m in ALIGN_METHODS]
            + [f"eval_benign_{fr}_s{s}" for s in seeds for fr in FREEZES]
            + ["eval_align_none_aoaprompt"] + [f"eval_aoa_{fr}_s{s}_aoaprompt" for s in seeds for fr in FREEZES]
            + [f"ablate_{c}" for c in ABLATED] + [x for c in ABLATED for x in random_runs(c, random_seeds)])


def train_runs(seeds: list[int], align_tags: list[str]) -> list[str]:
    return ([f"align_{m}{t}" for t in align_tags for m in ALIGN_METHODS]
            + [f"{kind}_{fr}_s{s}" for kind in ("benign", "aoa") for s in seeds for fr in FREEZES])


# --------------------------------------------------------------------------- artifacts
def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def eval_field(run_dir: Path, task: str, *keys: str):
    """A field of one task of a run's eval.json (e.g. "harmful", "n"); None where absent."""
    x = (read_json(run_dir / "eval.json") or {}).get(task)
    for k in keys:
        x = x.get(k) if isinstance(x, dict) else None
    return x


def run_config(run_dir: Path) -> DictConfig | None:
    """The run's config: the resolved copy a train run exports, else the one Hydra saved."""
    for p in (run_dir / "model" / "safety_units_config.yaml", run_dir / ".hydra" / "config.yaml"):
        if p.is_file():
            return OmegaConf.load(p)
    return None


def setting(cfg: DictConfig | None, key: str):
    """A config value as plain Python; None when the run, the key or its interpolation is missing."""
    if cfg is None:
        return None
    v = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if not isinstance(v, DictConfig):
        return v
    try:
        return OmegaConf.to_container(v, resolve=True)
    except OmegaConfBaseException:  # an interpolation only Hydra can resolve (e.g. ${hydra:...}): keep it as written
        return OmegaConf.to_container(v, resolve=False)


def text(x) -> str:
    return "n/a" if x is None else str(x)


def distinct(study: Path, runs: list[str], read) -> str:
    """The values `read(run dir)` takes over runs, e.g. "48" or "48 (eval_a, eval_b); 128 (eval_c)"."""
    by_value: dict[str, list[str]] = {}
    for r in runs:
        if (study / r).is_dir():
            by_value.setdefault(text(read(study / r)), []).append(r)
    if len(by_value) <= 1:
        return next(iter(by_value), "n/a")
    return "; ".join(f"{v} ({', '.join(rs)})" for v, rs in by_value.items())


def judge_of(run_dir: Path) -> str | None:
    """The refusal judge an eval run used: its name (eval_meta.json) and config target (and path, if any)."""
    cfg, meta = run_config(run_dir), read_json(run_dir / "eval_meta.json") or {}
    target, path = setting(cfg, "judge._target_"), setting(cfg, "judge.path")
    if target is None and not meta.get("judge"):
        return None
    return f"{meta.get('judge') or 'unnamed'} (`{target}`" + (f", path {path}" if path else "") + ")"


def one_judge(study: Path, runs: list[str]) -> str:
    """The one judge of all eval runs; runs judged differently are not compared (ConfigError)."""
    judges: dict[str, list[str]] = {}
    for r in runs:
        if (study / r / "eval.json").is_file():
            judges.setdefault(text(judge_of(study / r)), []).append(r)
    if len(judges) > 1:
        raise ConfigError("the study's evaluations used different refusal judges, so their ASRs are not comparable: "
                          + "; ".join(f"{j}: {', '.join(rs)}" for j, rs in judges.items())
                          + ". Re-evaluate them with one judge.")
    return next(iter(judges), "n/a")


def units_zeroed(study: Path, runs: list[str]) -> dict[str, int | None]:
    return {r: ((read_json(study / r / "eval_meta.json") or {}).get("ablation") or {}).get("units_zeroed")
            for r in runs}


def command_of(run_dir: Path) -> str | None:
    """The command that made a run, from the overrides Hydra recorded (plus its run dir, if one was given)."""
    over, cfg = run_dir / ".hydra" / "overrides.yaml", run_dir / ".hydra" / "config.yaml"
    if not over.is_file() or not cfg.is_file():
        return None
    args = list(OmegaConf.load(over))
    hydra = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml") if (run_dir / ".hydra" / "hydra.yaml").is_file() else None
    args += [o for o in (setting(hydra, "hydra.overrides.hydra") or []) if o.startswith("hydra.run.dir=")]
    return f"python {setting(OmegaConf.load(cfg), 'task_name')}.py " + " ".join(shlex.quote(str(a)) for a in args)


# --------------------------------------------------------------------------- sections
def values_table(evals: dict, rows: list[tuple[str, str]]) -> str:
    lines = ["| condition | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, run in rows:
        cells = []
        for _, key in COLUMNS:
            r, d = result(evals, run, key), 2 if key == "ppl" else 3
            cells.append("n/a" if r is None else
                         f"{r['value']:.{d}f} [{r['ci_low']:.{d}f}, {r['ci_high']:.{d}f}] (n={r['n']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unit_shares(summary: dict | None) -> str:
    if summary is None:
        return "n/a (no unit_map.json)"
    lines = ["| kind | units | ESU | EUU | CU | RU |", "|---|---:|---:|---:|---:|---:|"]
    for kind, r in summary["total"].items():
        lines.append(f"| {kind} | {r['units']} | " + " | ".join(
            f"{r[c]['count']} ({100 * r[c]['share']:.1f}%)" for c in ("esu", "euu", "cu", "ru")) + " |")
    return "\n".join(lines)


def attribution_settings(name: str, summary: dict | None) -> str:
    """Scoring, calibration data and classification settings of one unit map (its metadata)."""
    if summary is None:
        return f"{name}: n/a (no unit_map.json)"
    m = summary["metadata"]
    cal = m.get("calibration") or {}
    data = "; ".join(f"{w} {text(c.get('nsamples'))} x `{Path(c['path']).parent.name}/{Path(c['path']).name}` "
                     f"(max length {text(c.get('max_length'))})" for w, c in cal.items() if c.get("path"))
    classify = m.get("classify") or {}
    if classify.get("method") == "set_difference":  # class sizes are an outcome: give the settings and the result
        got = "; ".join(f"{kind} " + " / ".join(f"{c.upper()} {100 * v:.1f}%" for c, v in sh.items())
                        for kind, sh in (m.get("class_shares") or {}).items())
        classes = (f"set difference of the top {100 * classify.get('top_safety', 0):g}% by safety and top "
                   f"{100 * classify.get('top_utility', 0):g}% by utility (RU: bottom {100 * classify.get('bottom', 0):g}% "
                   f"on both), resulting shares {got or 'n/a'}")
    else:
        classes = "target shares per kind " + " / ".join(f"{c.upper()} {100 * s:g}%"
                                                         for c, s in (classify.get("shares") or {}).items())
    return (f"{name}: scoring `{text((m.get('scoring') or {}).get('method'))}`, tokens "
            f"`{text((m.get('scoring') or {}).get('tokens'))}`; calibration {data or 'n/a'}; {classes}, "
            f"{text(m.get('normalization'))} normalisation.")


TRAIN_KEYS = [("data", "data.name"), ("freeze", "freeze.strategy"), ("frozen share", "freeze.total_share"),
              ("random like", "freeze.like"), ("lr", "optim.lr"), ("epochs", "trainer.max_epochs"),
              ("max steps", "trainer.max_steps"), ("samples", "data.num_samples"), ("max length", "data.max_length"),
              ("batch", "data.batch_size"), ("seed", "seed")]


def train_setting(cfg: DictConfig, key: str) -> str:
    """One cell of the settings table; freezing keys only where the run's strategy uses them."""
    strategy, like = setting(cfg, "freeze.strategy"), setting(cfg, "freeze.like")
    if key == "freeze.total_share" and not (strategy == "esu_cu" or (strategy == "random" and like == "esu_cu")):
        return "-"
    if key == "freeze.like" and strategy != "random":
        return "-"
    return text(setting(cfg, key))


def train_settings(study: Path, runs: list[str]) -> str:
    lines = ["| run | " + " | ".join(k for k, _ in TRAIN_KEYS) + " |", "|---" * (len(TRAIN_KEYS) + 1) + "|"]
    for r in runs:
        cfg = run_config(study / r)
        cells = ["(missing)"] * len(TRAIN_KEYS) if cfg is None else [train_setting(cfg, k) for _, k in TRAIN_KEYS]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def random_label(cfg: DictConfig | None) -> str:
    like, share = setting(cfg, "freeze.like"), setting(cfg, "freeze.total_share")
    if like == "esu_cu" and share is not None:
        return f"random {100 * share:g}%"
    return f"random like {text(like)}"


# --------------------------------------------------------------------------- the report
def build_report(study: Path, seeds: list[int], random_seeds: list[int], align_tags: list[str],
                 commands: list[tuple[str, str]], minutes: float | None = None) -> str:
    """The markdown report. commands: (run name, planned command) in stage order; a run's recorded overrides
    replace its planned command."""
    evals_expected = eval_runs(seeds, random_seeds, align_tags)
    evals = {r: read_json(study / r / "eval.json") for r in evals_expected}
    if all(e is None for e in evals.values()):
        raise ConfigError(f"no study evaluations under {study} (none of {len(evals)} eval.json files exists): run "
                          f"`python scripts/run_study.py` first, or pass the --seeds/--random-seeds it ran with.")
    names = list(dict.fromkeys([r for r, _ in commands] + train_runs(seeds, align_tags) + evals_expected))
    missing = [r for r in names if not (study / r).is_dir()] + \
        [r for r in evals_expected if (study / r).is_dir() and evals[r] is None]
    maps = {n: read_json(study / n / "unit_map.json") for n in ("attribute_base", "attribute_aligned")}
    cfg = {r: run_config(study / r) for r in train_runs(seeds, align_tags)}
    lrs = {}
    for t in align_tags:
        full, ru = setting(cfg[f"align_none{t}"], "optim.lr"), setting(cfg[f"align_ru_only{t}"], "optim.lr")
        lrs[t] = text(full) if full == ru else f"{text(full)} (full) / {text(ru)} (RU-only)"
    rnd = random_label(cfg[f"benign_random_s{seeds[0]}"] if seeds else None)
    judge = one_judge(study, evals_expected)
    eval_read = [r for r in evals_expected if evals[r] is not None]
    tokens = distinct(study, eval_read, lambda d: setting(run_config(d), "eval.max_new_tokens"))
    advbench = distinct(study, eval_read, lambda d: eval_field(d, "harmful", "n"))
    chance = distinct(study, eval_read, lambda d: eval_field(d, "mmlu/acc", "extra", "chance"))
    mix = setting(cfg[f"align_none{align_tags[0]}"] if align_tags else None, "data.sources") or {}
    align_cfg = cfg.get(f"align_none{align_tags[0]}") if align_tags else None
    aoa_cfg = cfg.get(f"aoa_none_s{seeds[0]}") if seeds else None
    aoa_eval = run_config(study / "eval_align_none_aoaprompt")
    model = (read_json(study / "eval_shipped" / "eval_meta.json") or {}).get("model")
    sections = [
        f"# SSAH study on {text(model)}",
        "",
        f"Hardware (alignment run's config): trainer.accelerator={text(setting(align_cfg, 'trainer.accelerator'))}, "
        f"model.dtype={text(setting(align_cfg, 'model.dtype'))}."
        + (f" Wall time of this run of the script: {minutes:.0f} min." if minutes else ""),
        "Every number below is computed from the `eval.json`, `eval_meta.json`, `unit_map.json` and resolved configs "
        "of this study's runs; intervals are 95% (Wilson for rates, bootstrap for perplexity); changes between runs "
        "are paired on the same prompts (bootstrap interval over prompts, exact McNemar p), and runs whose prompt "
        "hashes differ are not compared. \"ASR all harmful\" pools " + pooled_tasks(evals)
        + f" (AdvBench eval half: {advbench} prompts).",
        "",
        f"**Refusal judge**: {judge}. Greedy decoding, at most {tokens} new tokens.",
        "",
        "## Settings (from the runs)",
        "",
        *[f"- {attribution_settings(n, m)}" for n, m in maps.items()],
        "- Alignment data: " + (", ".join(f"`{k}` weight {text(v.get('weight'))}" for k, v in mix.items()) or "n/a")
        + ".",
        "",
        train_settings(study, train_runs(seeds, align_tags)),
        "",
    ]
    if missing:
        sections += ["**Missing runs** (shown as n/a; no criterion uses them): " + ", ".join(missing) + ".", ""]
    sections += [
        "## Verdicts",
        "",
        *[f"- {v.line()}" for v in verdicts(evals, seeds, random_seeds, lrs, rnd)],
        "",
        "## (a) Alignment budget: full vs RU-only alignment of the shipped model",
        "",
        values_table(evals, [("shipped model", "eval_shipped")] + [
            (f"aligned, {ALIGN_METHODS[m]}, lr {lrs[t]}", f"eval_align_{m}{t}") for t in align_tags
            for m in ALIGN_METHODS]),
        "",
        paired_table(evals, "eval_shipped", [(f"aligned, {ALIGN_METHODS[m]}, lr {lrs[t]}", f"eval_align_{m}{t}")
                                             for t in align_tags for m in ALIGN_METHODS]),
        "",
        ("The perplexity task is a held-out slice of instruction data; an alignment mix that contains such data lowers "
        "perplexity in proportion to how much of it a run learned, so over-refusal (OKTest, harmless) is the cleaner "
        f"utility cost here. MMLU accuracy at chance would be {chance}."),
        "",
        "Units of the shipped model (its RU are the budget):",
        "",
        unit_shares(maps["attribute_base"]),
        "",
        "## (b) Ablating units of the aligned model",
        "",
        "Each class is compared only with random unit sets of its own size (per unit kind):",
        "",
        paired_table(evals, "eval_align_none", ablation_rows(random_seeds),
                     units_zeroed(study, [r for _, r in ablation_rows(random_seeds)])),
        "",
        values_table(evals, [("aligned (no ablation)", "eval_align_none")] + ablation_rows(random_seeds)),
        "",
        "Units of the aligned model:",
        "",
        unit_shares(maps["attribute_aligned"]),
        "",
        "![classes per layer, aligned](units_per_layer_aligned.png)",
        "",
        "## (c) Fine-tuning the aligned model with units frozen",
        "",
    ]
    aoa_title = (f"The AOA identity-shift attack: fine-tuned on data `{text(setting(aoa_cfg, 'data.name'))}`, batch "
                 f"{text(setting(aoa_cfg, 'data.batch_size'))}, {text(setting(aoa_cfg, 'trainer.max_epochs'))} epochs "
                 f"at lr {text(setting(aoa_cfg, 'optim.lr'))}; evaluated with the user template "
                 f"`{text(setting(aoa_eval, 'eval.template'))}` and "
                 + ("a system prompt" if setting(aoa_eval, "eval.system") else "no system prompt")
                 + ", like the aligned baseline in the first row")
    for kind, title, base, suffix in (("benign", "Benign fine-tuning (evaluated plainly)", "eval_align_none", ""),
                                      ("aoa", aoa_title, "eval_align_none_aoaprompt", "_aoaprompt")):
        rows = [(f"{kind} fine-tune, freeze={fr}, seed {s}", f"eval_{kind}_{fr}_s{s}{suffix}")
                for s in seeds for fr in FREEZES]
        sections += [f"{title}:", "", values_table(evals, [("aligned (before fine-tuning)", base)] + rows), ""]
        for s in seeds:
            none = f"eval_{kind}_none_s{s}{suffix}"
            sections += [paired_table(evals, none, [(lab, r) for lab, r in rows if r.endswith(f"_s{s}{suffix}")
                                                    and r != none]), ""]
    sections += [
        "![ASR vs perplexity](asr_vs_ppl.png)",
        "",
        "## Limits of this run",
        "",
        ("- Scale: the sizes in the settings table; `conf/experiment/ssah/` holds the GPU-scale ones "
        "(`python scripts/run_study.py --scale gpu`)."),
        f"- Seeds: fine-tuning seed(s) {seeds}; random ablation seeds {random_seeds}; an ASR change counts only "
        f"beyond {MARGIN:.2f}."
        + (" With one fine-tuning seed, differences between freeze strategies are not replicated." if len(seeds) == 1
           else ""),
        ("- The aligned model comes from one supervised alignment run, not a model aligned at length (SFT + RLHF) "
        "like the paper's Llama-2-chat; where its safety lives may differ."),
        f"- Refusal is judged by {judge} on at most {tokens} generated tokens.",
        "",
        "## Commands (in order)",
        "",
        "```bash",
        *[command_of(study / r) or f"{cmd}   # not run" for r, cmd in commands],
        "```",
        "",
        "Generations with per-completion verdicts: `<run dir>/generations.jsonl` (not committed).",
    ]
    return "\n".join(sections) + "\n"


def pooled_tasks(evals: dict) -> str:
    """The harmful tasks the runs' pooled ASR is made of (as found in the first run that has them)."""
    for ev in evals.values():
        p = pooled(ev)
        if p is not None:
            return ", ".join(f"`{t}`" for t in p["extra"]["tasks"])
    return "n/a"


def tradeoff_points(evals: dict, rows: list[tuple[str, str]]) -> list[dict]:
    return [{"label": label, "asr": value(evals, r, POOLED), "ppl": value(evals, r, "ppl")} for label, r in rows
            if value(evals, r, POOLED) is not None and value(evals, r, "ppl") is not None]


def write_report(study: Path, results: Path, seeds: list[int], random_seeds: list[int], align_tags: list[str],
                 commands: list[tuple[str, str]], minutes: float | None = None) -> Path:
    """Build the report (raises before writing anything if it cannot), then copy plots and unit maps beside it."""
    from safety_units.plots import plot_tradeoff

    md = build_report(study, seeds, random_seeds, align_tags, commands, minutes)
    results.mkdir(parents=True, exist_ok=True)
    for name, dst in (("attribute_base", "shipped"), ("attribute_aligned", "aligned")):
        if (study / name / "units_per_layer.png").is_file():
            shutil.copy2(study / name / "units_per_layer.png", results / f"units_per_layer_{dst}.png")
        if (study / name / "unit_map.json").is_file():
            shutil.copy2(study / name / "unit_map.json", results / f"unit_map_{name.split('_')[1]}.json")
    runs = eval_runs(seeds, random_seeds, align_tags)
    evals = {r: read_json(study / r / "eval.json") for r in runs}
    points = tradeoff_points(evals, [(r.removeprefix("eval_"), r) for r in runs])
    if points:
        plot_tradeoff(points, results / "asr_vs_ppl.png", "ppl", "asr", "perplexity on held-out instructions "
                      "(lower is better)", "attack success rate, pooled harmful sets (lower is safer)",
                      "safety vs utility per condition")
    path = results / "ssah_smollm2.md"
    path.write_text(md)
    return path
