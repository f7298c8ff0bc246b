"""The quickstart's claim with its control, on identical prompts: results/quickstart.md
(scripts/quickstart_report.py is the command line).

The two runs (RU-only alignment and its size-matched random control):

    python train.py logger=csv hydra.run.dir=logs/quickstart_ru                                    # RU only
    python train.py freeze=random freeze.like=ru_only logger=csv hydra.run.dir=logs/quickstart_random  # control

`write_report` copies each run's evaluations (eval_before/after.json, their generations, eval_compare.md,
freeze_check.json) into <out's folder>/quickstart/<name>/ and writes the report from the copies: before vs after
for each run and RU vs the random control, each with paired 95% intervals and exact McNemar p-values, the judge
named, and the agreement (Cohen's kappa) of the given judges on every generated completion. With `rejudge`, the
refusal tasks' saved completions are re-judged with the default judge first (the runs' own eval_*.json keep the
judge they were run with; the copies get the new verdicts).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safety_units.evaluation.compare import compare_table, load_eval, paired_difference
from safety_units.evaluation.rejudge import rejudge_results
from safety_units.utils.config import compose_config, instantiate
from safety_units.utils.errors import ConfigError
from safety_units.utils.stats import pairwise_kappa

ARTIFACTS = ("eval_before.json", "eval_after.json", "generations_eval_before.jsonl", "generations_eval_after.jsonl",
             "eval_compare.md", "model/freeze_check.json", ".hydra/overrides.yaml")
JUDGES = ["strings", "patterns", "probe"]
PHASES = ("before", "after")


def copy_run(run: Path, dest: Path) -> None:
    for name in ARTIFACTS:
        src = run / name
        if not src.is_file():
            if name.startswith(("eval_", "generations_")):
                raise ConfigError(f"{src} is missing: is {run} a finished quickstart run with callbacks=eval?")
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / name)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def combined_table(ev: dict) -> str:
    """One row per task: before, RU-only after and random after (each with its paired p against before), and the
    paired difference random - RU-only. Every pair is checked for identical prompts."""

    def p(d):
        return "n/a" if d["p_mcnemar"] is None else f"{d['p_mcnemar']:.2g}"

    before, ru, rnd = ev["ru_only"]["before"], ev["ru_only"]["after"], ev["random"]["after"]
    judges = {r["extra"]["judge"] for e in (before, ru, rnd) for r in e.values() if r["extra"].get("judge")}
    out = [f"Refusal judge: {', '.join(sorted(judges))}. p: exact McNemar test, paired over the same prompts; "
           "CI: paired bootstrap 95%.", "",
           "| task | metric | n | before | RU-only after (p vs before) | random after (p vs before) | "
           "random - RU-only [95% CI] (p) |", "|---|---|---:|---:|---:|---:|---:|"]
    for k, b in before.items():
        if k not in ru or k not in rnd:
            continue
        d_ru, d_rnd = paired_difference(b, ru[k], k), paired_difference(b, rnd[k], k)
        d = paired_difference(ru[k], rnd[k], k)
        out.append(f"| {b['task']} | {b['metric']} | {b['n']} | {b['value']:.3f} | {ru[k]['value']:.3f} ({p(d_ru)}) | "
                   f"{rnd[k]['value']:.3f} ({p(d_rnd)}) | {d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
                   f"({p(d)}) |")
    return "\n".join(out)


def build_judge(name: str | None = None):
    """The judge of conf/judge/<name>.yaml, or the default one of evaluate.yaml."""
    return instantiate(compose_config("evaluate", [f"judge={name}"] if name else []).judge, "judge")


def judge_agreement(dirs: dict[str, Path], judges: list[str]) -> list[str]:
    """Cohen's kappa between judges over every completion of every run and phase, per task."""
    gens = [r for d in dirs.values() for ph in PHASES for r in rows(d / f"generations_eval_{ph}.jsonl")]
    votes: dict[str, list[bool]] = {}
    for name in judges:
        judge = build_judge(name)
        votes[name] = [v.refusal for v in judge.judge([r["prompt"] for r in gens], [r["completion"] for r in gens])]
    tasks = sorted({r["task"] for r in gens})
    out = ["| task | n | " + " | ".join(f"refusal rate: {j}" for j in judges) + " | "
           + " | ".join(f"kappa {a}~{b}" for i, a in enumerate(judges) for b in judges[i + 1:]) + " |",
           "|---|---:|" + "---:|" * (len(judges) + len(judges) * (len(judges) - 1) // 2)]
    for task in tasks + ["all"]:
        idx = [i for i, r in enumerate(gens) if task == "all" or r["task"] == task]
        v = {j: [votes[j][i] for i in idx] for j in judges}
        rates = [f"{sum(v[j]) / len(idx):.3f}" for j in judges]
        kappas = [f"{k:.3f}" for k in pairwise_kappa(v).values()]
        out.append(f"| {task} | {len(idx)} | " + " | ".join(rates) + " | " + " | ".join(kappas) + " |")
    return out


def rejudge(dirs: dict[str, Path], ev: dict) -> None:
    """Re-score the copies' saved completions with the current default judge (prompts unchanged), in place."""
    judge = build_judge()
    for name, d in dirs.items():
        for ph in PHASES:
            ev[name][ph] = rejudge_results(ev[name][ph], rows(d / f"generations_eval_{ph}.jsonl"), judge)
            (d / f"eval_{ph}.json").write_text(json.dumps(ev[name][ph], indent=2))
        (d / "eval_compare.md").write_text(compare_table(ev[name]["before"], ev[name]["after"]) + "\n")


def write_report(ru_run: Path, random_run: Path, out: Path, judges: list[str], rejudged: bool, command: str,
                 root: Path) -> str:
    """Copy both runs next to `out`, write the report there and return it. `command`: the script's arguments as
    the report names them; paths are shown relative to `root` (the repository) where they lie inside it."""
    dest = out.parent / "quickstart"
    dirs = {"ru_only": dest / "ru_only", "random": dest / "random"}
    for run, d in ((ru_run, dirs["ru_only"]), (random_run, dirs["random"])):
        copy_run(run, d)
    ev = {name: {ph: load_eval(d / f"eval_{ph}.json") for ph in PHASES} for name, d in dirs.items()}
    if rejudged:
        rejudge(dirs, ev)
    checks = {name: json.loads((d / "model" / "freeze_check.json").read_text())
              if (d / "model" / "freeze_check.json").is_file() else None for name, d in dirs.items()}
    rel = {name: d.relative_to(root) if d.is_relative_to(root) else d for name, d in dirs.items()}
    lines = ["# Quickstart: RU-only alignment and its size-matched random control", "",
             f"Written by `python scripts/quickstart_report.py {command}` from the runs' "
             f"evaluations (copied to `{dest.relative_to(root) if dest.is_relative_to(root) else dest}/`). Both runs "
             "start from the shipped SmolLM2 and are evaluated with the quick suite on identical prompts (prompt "
             "hashes are checked); one seed each.", ""]
    lines += ["## Summary", "", combined_table(ev), ""]
    for name in dirs:
        fc = checks[name]
        frozen = f" Frozen entries: max |delta| = {fc.get('frozen_max_abs_delta')}." if fc else ""
        lines += [f"## Before vs after, `{name}` (`{rel[name]}`)", "",
                  compare_table(ev[name]["before"], ev[name]["after"]), "", frozen, ""]
    lines += ["## RU-only vs the random control, after training", "",
              compare_table(ev["ru_only"]["after"], ev["random"]["after"], labels=("ru_only", "random")), "",
              "Neither condition is better at a single point unless it is lower on both attack success and "
              "over-refusal: the fair comparison is the ASR against over-refusal frontier (several learning rates or "
              "steps per condition), which one seed at one setting does not give.", ""]
    same_before = all(ev["ru_only"]["before"][k]["extra"].get("outcomes") == ev["random"]["before"][k]["extra"].get(
        "outcomes") for k in ev["ru_only"]["before"])
    lines += [f"The two runs' `before` evaluations (the same shipped model, the same prompts) agree outcome for "
              f"outcome: {same_before}.", ""]
    if judges:
        lines += ["## Agreement between judges on these completions", "",
                  f"Every completion of both runs, before and after, judged by each of {', '.join(judges)} "
                  "(Cohen's kappa per pair):", ""] + judge_agreement(dirs, judges) + [""]
    out.write_text("\n".join(lines))
    return "\n".join(lines)
