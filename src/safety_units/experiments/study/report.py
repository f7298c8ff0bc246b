"""The SSAH study v2 report (results/ssah_smollm2.md, results/ssah_smollm2/), built only from the study's artifacts.

Settings come from study.json and point.json, numbers from eval.json / eval_meta.json; the criteria live in
safety_units.experiments.study.verdicts, the claim tables in study_tables, the plots in study_plots. summary.json holds every
number the markdown prints. The v1 report is parsed, not restated, for the "v1 -> v2" section.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path

from safety_units.utils.errors import ConfigError
from safety_units.experiments.study.plots import write_plots
from safety_units.experiments.study.tables import section_a, section_b, section_c, stage_field
from safety_units.experiments.study.verdicts import (
    ABLATED,
    ALIGN_METHODS,
    ALPHA,
    FAMILIES,
    FREEZES,
    MARGIN,
    MOST,
    UTILITY_TOL,
    Verdict,
    compare,
    diff_text,
    load_study,
    num,
    read_json,
    value,
    verdicts,
)

NAME = "ssah_smollm2"
# --------------------------------------------------------------------------- header
def stage_group(name: str) -> str:
    """What a stage costs like: setup stages by name, the others by claim and kind (b_random_esu_s0 -> b)."""
    return name.split("_")[0] if name[:2] in ("a_", "b_", "c_") else name


def stage_times(st: dict, lists: dict) -> tuple[dict, list[str]]:
    """Measured seconds per stage group (<stage>.stage.json), and the whole plan's time projected from them: each
    stage not run costs its group's mean. Answers "does the plan fit its budget" from this study's own runs."""
    seconds = {}
    for name in lists["planned"]:
        rec = read_json(st["dir"] / f"{name}.stage.json")
        if rec and rec.get("seconds") is not None:
            seconds[name] = float(rec["seconds"])
    groups: dict[str, dict] = {}
    for name in lists["planned"]:
        g = groups.setdefault(stage_group(name), {"planned": 0, "measured": []})
        g["planned"] += 1
        if name in seconds:
            g["measured"].append(seconds[name])
    rows, total, unmeasured = [], 0.0, []
    for g, d in groups.items():
        mean = sum(d["measured"]) / len(d["measured"]) if d["measured"] else None
        d.update(mean_seconds=mean, projected_seconds=None if mean is None else mean * d["planned"])
        if mean is None:
            unmeasured.append(g)
        else:
            total += mean * d["planned"]
        rows.append(f"| {g} | {d['planned']} | {len(d['measured'])} | {num(mean, 1)} | "
                    f"{num(d['projected_seconds'] and d['projected_seconds'] / 60, 1)} |")
    # after the setup, `workers` processes share the other stages (their seconds were measured running side by side)
    workers = int(st["study"].get("workers") or 1)
    setup = sum(d["projected_seconds"] or 0.0 for g, d in groups.items() if g not in ("a", "b", "c"))
    wall = setup + (total - setup) / workers
    out = {"groups": groups, "projected_minutes": total / 60, "workers": workers,
           "projected_wall_minutes": wall / 60, "unmeasured_groups": unmeasured}
    run_in = "" if workers == 1 else f"; in {workers} worker processes after the setup, {wall / 60:.1f} min of wall time"
    lines = ["Stage times (seconds from `<stage>.stage.json`; a stage not run is projected at its group's mean):", "",
             "| stages | planned | measured | mean s | projected min |", "|---|---:|---:|---:|---:|", *rows, "",
             f"The whole plan projects to {total / 60:.1f} stage-minutes on this hardware{run_in}"
             + (f", not counting groups with no measured stage ({', '.join(unmeasured)})" if unmeasured else "")
             + "."]
    return out, lines



def stage_lists(st: dict) -> dict:
    """Stages of the whole plan by their outputs on disk (a study is often run in parts: --only, --resume), and
    what the last run of the runner did with the stages it selected (study.json)."""
    s, stages = st["study"], st["plan"]["stages"]
    failed = s.get("failed") or {}
    # an attribution also counts as done by its unit_map.json (what a report's copy of the artifacts keeps)
    done = [n for n, f in stages.items() if (st["dir"] / n / f).is_file()
            or (f == "unit_map.safetensors" and (st["dir"] / n / "unit_map.json").is_file())]
    return {"planned": list(stages), "done": done, "failed": failed,
            "not_run": [n for n in stages if n not in done and n not in failed],
            "last_run": {k: s.get(k) or [] for k in ("planned", "ran", "skipped", "not_run")}}


def distinct(by_stage: dict[str, object]) -> dict[str, list[str]]:
    """value -> the stages that have it (values as text)."""
    out: dict[str, list[str]] = {}
    for stage, v in by_stage.items():
        out.setdefault("n/a" if v is None else str(v), []).append(stage)
    return out


def distinct_text(groups: dict[str, list[str]]) -> str:
    if len(groups) <= 1:
        return next(iter(groups), "n/a")
    return "; ".join(f"{v} ({len(s)} stage(s): {', '.join(s[:6])}{', ...' if len(s) > 6 else ''})"
                     for v, s in groups.items())


def header(st: dict) -> tuple[dict, list[str]]:
    """Where and how the study ran, the judge, prompt counts, and the aligned model against the shipped one."""
    s, lists = st["study"], stage_lists(st)
    evaluated = [n for n, r in st["runs"].items() if r["eval"] is not None]
    judges = distinct({n: stage_field(st, n, "meta", "judge") for n in evaluated})
    tasks = sorted({t for n in evaluated for t in st["runs"][n]["eval"]})
    prompts = {t: distinct({n: (st["runs"][n]["eval"].get(t) or {}).get("n") for n in evaluated
                            if t in st["runs"][n]["eval"]}) for t in tasks}
    model = next((stage_field(st, n, "meta", "model") for n in ("shipped", "align", *evaluated)
                  if stage_field(st, n, "meta", "model")), None)
    aligned = {"shipped": {t: value(st, "shipped", t) for t in ("harmful", "oktest", "ppl")},
               "align": {t: value(st, "align", t) for t in ("harmful", "oktest", "ppl")},
               "change": {t: compare(st, [("shipped", "align")], t) for t in ("harmful", "oktest", "ppl")}}
    train = stage_field(st, "align", "point", "train")
    data = {"model": model, "scale": s.get("scale"), "hardware": s.get("hardware"), "device": s.get("device"),
            "minutes": s.get("minutes"), "budget_minutes": s.get("budget_minutes"), "stages": lists,
            "judges": judges, "prompts": prompts, "aligned": aligned, "align_train": train,
            "settings": s.get("settings"), "plan": st["plan"],
            "constants": {"MARGIN": MARGIN, "ALPHA": ALPHA, "UTILITY_TOL": UTILITY_TOL, "MOST": MOST}}
    last = lists["last_run"]
    lines = [f"# SSAH study v2 on {model or 'n/a'}", "",
             f"Hardware: {s.get('hardware') or 'n/a'}; device: {s.get('device') or 'n/a'}; scale "
             f"`{s.get('scale') or 'n/a'}`; the last run of the study script took {num(s.get('minutes'), 0)} min"
             + (f" (time budget: {num(s.get('budget_minutes'), 0)} min)." if s.get("budget_minutes") is not None
                else " (no time budget).")
             + ("" if s else " No study.json: the plan is rebuilt from the stages found."), "",
             f"Stages: {len(lists['planned'])} planned; {len(lists['done'])} finished (outputs on disk), "
             f"{len(lists['not_run'])} not run, {len(lists['failed'])} failed. The last run of the script "
             f"selected {len(last['planned'])}: ran {len(last['ran'])}, skipped {len(last['skipped'])} (finished "
             f"earlier, config unchanged), stopped by the time budget before {len(last['not_run'])}."]
    if lists["not_run"]:
        lines.append(f"- Not run (shown as n/a; no statistic uses them): {', '.join(lists['not_run'])}.")
    for name, msg in lists["failed"].items():
        lines.append(f"- Failed: `{name}`: {msg}")
    judge = (f"**Refusal judge**: {next(iter(judges))} (every evaluated stage)." if len(judges) == 1 else
             "**Refusal judges differ between stages, so their ASRs are not comparable**: " + distinct_text(judges)
             + "." if judges else "**Refusal judge**: n/a (no eval_meta.json).")
    lines += ["", judge, "", "Prompts per task (n in eval.json): " + "; ".join(
        f"`{t}` {distinct_text(g)}" for t, g in prompts.items()) + ".", "",
        f"Constants fixed before any v2 number: an ASR difference counts as an effect beyond {MARGIN:.2f}; "
        f"significance p < {ALPHA}; a freeze may raise its fine-tune task's perplexity by at most "
        f"{UTILITY_TOL:.0%} over no freezing; (a) secondary share {MOST:.0%}. Settings source: "
        f"{st['plan']['source']}.", "", "## Setup", ""]
    a, ch = aligned, aligned["change"]
    lines += [f"The aligned model (`align`) against the shipped one: ASR {num(a['shipped']['harmful'])} -> "
              f"{num(a['align']['harmful'])} ({diff_text(ch['harmful'])}); over-refusal on OKTest "
              f"{num(a['shipped']['oktest'])} -> {num(a['align']['oktest'])} ({diff_text(ch['oktest'])}) -- the "
              f"over-refusal cost of alignment; perplexity {num(a['shipped']['ppl'], 2)} -> "
              f"{num(a['align']['ppl'], 2)} ({diff_text(ch['ppl'], 2)}).", ""]
    if isinstance(train, dict):
        srcs = ((train.get("data_stats") or {}).get("sources") or {})
        lines.append(f"Its training (point.json): lr {train.get('lr', 'n/a')}, {train.get('epochs', 'n/a')} "
                     f"epoch(s), {train.get('global_step', 'n/a')} optimizer steps on "
                     f"{train.get('train_examples', 'n/a')} examples ("
                     + (", ".join(f"`{k}` {v}" for k, v in srcs.items()) or "sources n/a") + ").")
    else:
        lines.append("Its training: n/a (no point.json for `align`).")
    timing, timing_lines = stage_times(st, lists)
    data["timing"] = timing
    lines += ["", *timing_lines]
    settings = {**(s.get("settings") or {}), "extra_overrides": s.get("extra_overrides") or []}
    lines += ["", "Settings of every stage (study.json; lists are config overrides):", ""] + [
        f"- {k}: `{' '.join(map(str, v)) if isinstance(v, list) else v}`" for k, v in settings.items()] + [""]
    return data, lines


# --------------------------------------------------------------------------- v1 -> v2
def v1_verdicts_path(v1_report: Path) -> Path:
    """Where the frozen v1 report's verdicts are kept as data: <report without .md>/verdicts.json."""
    return Path(v1_report).with_suffix("") / "verdicts.json"


def load_v1(v1_report: Path) -> list[dict]:
    """The v1 verdicts [{"claim", "status", "text"}] in report order ([] when there is no v1 report)."""
    path = v1_verdicts_path(v1_report)
    if not path.is_file():
        return []
    try:
        verdicts = json.loads(path.read_text())["verdicts"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a v1 verdicts file ({e}); it holds {{\"verdicts\": [{{\"claim\", "
                          f"\"status\", \"text\"}}, ...]}}.") from None
    return verdicts


def v2_match(claim: str, vs: list[Verdict]) -> list[Verdict]:
    """The v2 verdicts that test what a v1 claim tested: the same letter, then the same lr / unit class / threat."""
    letter, low = claim[1], claim.lower()
    same = [v for v in vs if v.claim.startswith(f"({letter})")]
    if letter == "a":
        lr = re.search(r"lr (\S+)", claim)
        return [v for v in same if lr and v.claim.endswith(f"lr {lr.group(1)}")] or same[:1]
    if letter == "b":
        named = [c for c in ABLATED if re.search(rf"\b{c}\b", low)]
        cls = named or (["euu"] if "utility" in low else ["esu"])
        return [v for v in same if v.claim.split()[1].lower() in cls]
    hits = []
    for v in same:
        t = v.numbers.get("threat")
        word = t and t["label"].split(":")[-1].split(",")[0].strip()
        if word and re.search(rf"\b{re.escape(word)}\b", claim, re.IGNORECASE):
            hits.append(v)
    return hits or same[:1]


def v1_section(v1: list[dict], vs: list[Verdict], st: dict, path: Path, link: str) -> tuple[dict, list[str]]:
    """v1 claim / status next to the matching v2 verdicts, and what changed in method, from parsed values."""
    if not v1:
        return {"path": str(path), "claims": []}, [f"No v1 verdicts found in `{link}`."]
    rows = [{"claim": x["claim"], "status": x["status"],
             "v2": [{"claim": v.claim, "status": v.status} for v in v2_match(x["claim"], vs)]} for x in v1]
    lines = [f"v1 verdicts as written in [{Path(path).name}]({link}), next to the v2 verdicts that test the same claim:", "",
             "| v1 claim | v1 status | v2 verdict | v2 status |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['status']} | " + "<br>".join(m["claim"] for m in r["v2"]) + " | "
                     + "<br>".join(m["status"] for m in r["v2"]) + " |")
    c1 = [x for x in v1 if x["claim"].startswith("(c)")]
    v1_seeds = sorted({int(s) for x in c1 for s in re.findall(r"seed (\d+)", x["claim"])})
    v1_threats = list(dict.fromkeys(re.sub(r",? seed \d+$", "", x["claim"]) for x in c1))
    v1_random_a = any("random" in x["text"].lower() for x in v1 if x["claim"].startswith("(a)"))
    b_seeds = [re.search(r"seeds \[([^\]]*)\]", x["text"]) for x in v1 if x["claim"].startswith("(b)")]
    b_seeds = [m.group(1) for m in b_seeds if m]
    plan = st["plan"]
    fams: dict[str, int] = {}
    for t in plan["threats"]:
        fams[t["family"]] = fams.get(t["family"], 0) + 1
    data = {"path": str(path), "claims": rows, "v1_seeds": v1_seeds, "v1_threats": v1_threats,
            "v1_random_alignment_control": v1_random_a, "v1_random_ablation_seeds": b_seeds,
            "v2_seeds": plan["seeds"], "v2_random_seeds": plan["random_seeds"], "v2_lrs": plan["a_lrs"],
            "v2_threats": [t["key"] for t in plan["threats"]], "v2_families": fams}
    lines += ["", "What changed in method:", "",
              f"- Seeds: v1 fine-tuned each (c) condition with {len(v1_seeds)} seed(s) "
              f"({', '.join(map(str, v1_seeds)) or 'n/a'}), so it had no spread across seeds; v2 runs {len(plan['seeds'])} "
              f"seed(s) ({', '.join(map(str, plan['seeds']))}) per condition, reports mean ± sd and pools each "
              f"paired test over seeds.",
              "- (a): v1 compared full with RU-only alignment "
              + ("with" if v1_random_a else "without") + " a random control; v2 adds alignment of "
              f"{ALIGN_METHODS[-1]} unit sets as large as RU-only at each of {len(plan['a_lrs'])} learning rate(s) "
              f"({', '.join(plan['a_lrs'])}) and decides (a) by RU-only against that control.",
              f"- (b): v1's random ablation seeds: {'; '.join(f'[{s}]' for s in b_seeds) or 'n/a'}; v2 zeroes each of "
              f"{', '.join(c.upper() for c in ABLATED)} against {len(plan['random_seeds'])} random set(s) of its own "
              f"size.",
              f"- (c): v1 tested {len(v1_threats)} threat model(s) ({'; '.join(v1_threats)}); v2 tests "
              f"{len(plan['threats'])} (" + ", ".join(f"{n} {f}" for f, n in fams.items()) + "), each with the freezes "
              f"{', '.join(FREEZES)} (random and layers are the size-matched controls), and requires the attack to "
              f"work (premise) and the fine-tune's own utility to hold."]
    return data, lines


# --------------------------------------------------------------------------- the report
def clean(x):
    """JSON-safe: NaN/inf become null, tuples lists, dataclasses dicts."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, Verdict):
        return clean(asdict(x))
    return x


def build_report(study: Path, v1_report: Path, results: Path) -> tuple[dict, dict, dict]:
    """(markdown lines per section, summary, section data for the plots); raises before writing anything."""
    st = load_study(study)
    if not any(r["eval"] is not None for r in st["runs"].values()):
        raise ConfigError(f"no study evaluations under {study} (no stage dir has an eval.json): run "
                          f"`python scripts/run_study.py` first.")
    head, head_lines = header(st)
    vs = verdicts(st)
    a, a_lines = section_a(st)
    b, b_lines = section_b(st)
    c, c_lines = section_c(st)
    link = os.path.relpath(Path(v1_report).resolve(), Path(results).resolve())
    v1, v1_lines = v1_section(load_v1(v1_report), vs, st, v1_report, link)
    summary = {"header": head, "verdicts": vs, "a": a, "b": b, "c": c, "v1_to_v2": v1}
    sections = {"head": head_lines, "verdicts": ["## Verdicts", "", *[f"- {v.line()}" for v in vs], ""],
                "a": ["## (a) Alignment budget: full, RU-only and random alignment of the shipped model", "",
                      *a_lines, ""],
                "b": ["## (b) Ablating unit classes of the aligned model", "",
                      "Each class is compared only with random unit sets of its own size (eval_meta.json "
                      "`ablation.units_zeroed`).", "", *b_lines, ""],
                "c": ["## (c) Fine-tuning the aligned model under threat models, units frozen", "", *c_lines],
                "v1": ["## v1 -> v2", "", *v1_lines, ""]}
    return sections, summary, {"a": a, "c": c}


def plot_lines(plots: dict[str, str], names: list[str], name: str = NAME) -> list[str]:
    return [f"![{n}]({name}/{plots[n]})" if n in plots else f"({n}: no data to plot)" for n in names] + [""]


def write_report(study: Path, results: Path, v1_report: Path, name: str = NAME) -> Path:
    """Write results/<name>.md and results/<name>/ (plots, summary.json) from the study dir `study`; `v1_report` is
    the frozen v1 markdown report that the "v1 -> v2" section links, its verdicts read from v1_verdicts_path.
    Returns the markdown's path."""
    study, results, v1_report = Path(study), Path(results), Path(v1_report)
    sections, summary, data = build_report(study, v1_report, results)
    out = results / name
    plots = write_plots(data["a"], data["c"], out)
    fams = [f for f in FAMILIES if any(t["family"] == f for t in data["c"].values())]
    md = [*sections["head"], *sections["verdicts"], *sections["a"], *plot_lines(plots, ["a_frontier"], name),
          *sections["b"], *sections["c"],
          *plot_lines(plots, [f"c_asr_vs_utility_{f}" for f in fams] + ["c_asr_vs_p", "c_asr_vs_aoa_epochs"], name),
          *sections["v1"]]
    summary["plots"] = plots
    (out / "summary.json").write_text(json.dumps(clean(summary), indent=1, default=str) + "\n")
    path = results / f"{name}.md"
    path.write_text("\n".join(md) + "\n")
    return path
