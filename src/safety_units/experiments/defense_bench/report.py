"""results/defenses.md: the defense benchmark v2's report -- tuning, attacks, leaderboards at the protocol and at
each defense's worst attack with seed-level intervals, the goal, the answer to the user, the deviations from each
peer's code -- from the artifacts.

Two steps: `collect` reads the benchmark dir (each stage's eval.json, generations.jsonl and point.json; HS re-judged
by the HS judge, cells.harm_flags) and writes the small `results/defenses/cells.json`; `write_report` builds the
report from that file alone, so it rebuilds byte-identically from what is shipped. Every rule is in
safety_units.experiments.defense_bench.criteria.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from safety_units.experiments.defense_bench import criteria as C
from safety_units.experiments.defense_bench import plan as P
from safety_units.experiments.defense_bench.cells import HS_RULE
from safety_units.experiments.defense_bench.peers import DEVIATIONS
from safety_units.experiments.defense_bench.tuning import grid_points, read_cells, read_selection, stopped
from safety_units.experiments.judges.harm_report import validation
from safety_units.utils.stats import corrected_rate


def collect(bench: Path, scale, out_dir: Path, harm_judge, judge_report: Path | None = None) -> Path:
    """cells.json from the benchmark dir: every evaluated stage as a cell, the selection, the plan's grids and
    attacks, the stages' measured seconds and the HS judge's validation counts."""
    bench, out_dir = Path(bench), Path(out_dir)
    record = json.loads((bench / "study.json").read_text()) if (bench / "study.json").is_file() else {}
    stages = {f.name.removesuffix(".stage.json"): json.loads(f.read_text()).get("seconds")
              for f in sorted(bench.glob("*.stage.json"))}
    data = {"cells": read_cells(bench, harm_judge), "selection": read_selection(bench), "judge": HS_RULE,
            "judge_validation": validation(judge_report) if judge_report else None,
            "scale": {"name": scale.name, "hardware": scale.hardware, "workers": scale.workers,
                      "seeds": scale.seeds, "task_n": scale.task_n, "grid": scale.grid,
                      "attacks": {k: label for k, (label, _) in scale.attacks.items()},
                      "grids": {d: grid_points(d, scale.grid) for d in P.DEFENSES if d not in P.CONTROLS}},
            "planned": len(P.plan(scale, str(bench))), "stages": stages,
            "projection": projection(scale, bench, stages),
            "record": {k: record.get(k) for k in ("not_run", "failed")}}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cells.json"
    path.write_text(json.dumps(data, separators=(",", ":")))
    return path


def stage_key(st) -> tuple[str, str]:
    return st.kind, str(st.labels.get("defense") or "")


def projection(scale, bench: Path, seconds: dict[str, float | None]) -> dict:
    """The whole plan's wall hours at this scale from the stages measured so far: each planned stage costs the mean
    measured seconds of its kind and defense (else of its kind); the setup runs first, the rest spread evenly over
    the workers. Bounds before the choices: every defense's worst attack the protocol (fewest stages) or another
    (most), every defense carried past tuning; once selection.json names the worst attacks, also the plan as
    chosen ("chosen")."""
    plans = {"fewest": P.full_plan(scale, str(bench), P.PROTOCOL),
             "most": P.full_plan(scale, str(bench), list(scale.attacks)[-1])}
    if read_selection(bench).get("worst_attack"):
        plans["chosen"] = P.plan(scale, str(bench))
    by_key: dict[tuple, list[float]] = {}
    for st in {s.name: s for stages in plans.values() for s in stages}.values():
        if seconds.get(st.name):
            by_key.setdefault(stage_key(st), []).append(seconds[st.name])
            by_key.setdefault((st.kind, "*"), []).append(seconds[st.name])
    out = {}
    for label, stages in plans.items():
        setup = rest = 0.0
        unmeasured = 0
        for st in stages:
            known = by_key.get(stage_key(st)) or by_key.get((st.kind, "*"))
            if not known:
                unmeasured += 1
                continue
            cost = seconds.get(st.name) or mean(known)
            if st.labels.get("claim") == "setup":
                setup += cost
            else:
                rest += cost
        out[label] = {"stages": len(stages), "unmeasured": unmeasured,
                      "hours": (setup + rest / max(1, scale.workers)) / 3600}
    return out


def projection_text(proj: dict) -> str:
    few, most, chosen = proj["fewest"], proj["most"], proj.get("chosen")
    if few["unmeasured"] or most["unmeasured"]:
        return (f"The whole plan ({few['stages']}-{most['stages']} stages) cannot be projected yet: "
                f"{most['unmeasured']} of its stages are of kinds not measured so far.")
    text = ("The whole plan, projected from the stages measured so far (each stage at the mean of its kind and "
            "defense, the setup first, the rest spread over the workers; `report.projection`): ")
    bounds = (f"{few['hours']:.1f} h ({few['stages']} stages, every worst attack the protocol) to "
              f"{most['hours']:.1f} h ({most['stages']} stages, every worst attack another)")
    if chosen:
        return text + (f"{chosen['hours']:.1f} h for the plan as chosen ({chosen['stages']} stages); before the "
                       f"choices the bounds were {bounds}.")
    return text + bounds + "."


def _f(x, d=3):
    return "n/a" if x is None else f"{x:.{d}f}"


def _test(t) -> str:
    if t is None:
        return ""
    p1 = "" if t.get("mcnemar_p_seed") is None else f"; McNemar s{t['mcnemar_seed']} p={t['mcnemar_p_seed']:.2g}"
    return f"{t['diff']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}] p={t['p']:.2g} ({len(t['seeds'])} seeds{p1})"


def corrected(flags: list[int], val: dict | None) -> str:
    if not val or not flags:
        return ""
    r = corrected_rate(flags, val["tp"], val["fn"], val["tn"], val["fp"])
    return f" ({r['corrected']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}])"


def kind(d: str) -> str:
    if d == C.SFT:
        return "SFT"
    if d.startswith("shrink_"):
        return f"control: SFT's dW scaled to {d.removeprefix('shrink_')}'s norm"
    if d in P.CONTROLS:
        return f"control of {P.CONTROLS[d]}"
    stage = "alignment" if d in P.ALIGN_DEFENSES else "post-hoc" if d in P.POSTHOC_DEFENSES else "fine-tune"
    return f"{'unit' if d in P.UNIT_DEFENSES else 'peer'}, {stage}"


def control_of(d: str) -> str | None:
    """The defense whose effect `d` controls for (random: esu_cu; random_prune: antidote; shrink_x: x)."""
    return d.removeprefix("shrink_") if d.startswith("shrink_") else P.CONTROLS.get(d)


def by_seed_text(mine: list[dict]) -> str:
    return ", ".join(f"s{c['seed']} {_f(C.rate(c), 2)}" for c in mine)


def controls_of(d: str) -> list[str]:
    """The controls of defense `d`: its size-matched random set or prune (P.CONTROLS) and its matched-drift SFT."""
    return [c for c, of in P.CONTROLS.items() if of == d] + [f"shrink_{d}"] * (d in P.SHRINK_OF)


def leaderboard(cells: list[dict], worst: dict, at_worst: bool, val: dict | None, sft_seconds: dict,
                failed: set[str]) -> list[str]:
    """One row per defense at its chosen setting (cells: criteria.at_choice's) at the protocol or its worst
    attack, sorted by test HS; a defense whose grid had no eligible setting is marked (it ran seed 0 only)."""
    rows = ["| defense | kind | setting | attack | HS by seed | HS raw" + " (corrected [95% CI])" * bool(val) +
            " | ASR | FA | ||dW|| | OKTest refusal | ppl | time / SFT | HS - SFT [95% CI], seed-level | "
            "HS - its controls |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    defenses = sorted({c["defense"] for c in cells if c["claim"] == "finetune" and c["attack"] != "benign"})
    entries = []
    for d in defenses:
        attack = worst.get(control_of(d) or d, P.PROTOCOL) if at_worst else P.PROTOCOL
        s = C.summary(cells, d, attack)
        if s:
            entries.append((s["hs"], d, attack, s))
    for hs, d, attack, s in sorted(entries):
        mine = [c for _, c in sorted(C.by_seed(cells, d, attack).items())]
        flags = [x for c in mine for x in c["test"]["harmful"]]
        base = sft_seconds.get(attack)
        cost = _f(s["train_seconds"] / base, 2) if base and s.get("train_seconds") else "n/a"
        vs_ctl = "; ".join(f"{c}: {_test(t)}" for c in controls_of(d)
                           if (t := C.compare(cells, d, c, attack)) is not None)
        rows.append(f"| {d} | {kind(d)}{' (no eligible setting)' * (d in failed)} | {mine[0]['setting'] or '-'} | "
                    f"{attack} | "
                    f"{by_seed_text(mine)} | "
                    f"{_f(hs)}{corrected(flags, val)} | {_f(mean(c['test']['asr'] for c in mine))} | {_f(s['fa'])} | "
                    f"{_f(s['delta_norm'], 2)} | {_f(s['overrefusal'])} | {_f(s['ppl'], 2)} | {cost} | "
                    f"{'' if d == C.SFT else _test(C.compare(cells, d, C.SFT, attack))} | {vs_ctl} |")
    return rows


def tuning_section(cells: list[dict], sel: dict, grids: dict, seed: int) -> list[str]:
    """Every grid cell measured so far (seed `seed`, the protocol attack), judged by the tuning rule; the chosen
    setting once selection.json has it."""
    out = ["| defense | grid point (overrides) | val HS | val FA | eligible | chosen |", "|---|---|---:|---:|---|---|"]
    fine = [c for c in cells if c["claim"] == "finetune" and c["seed"] == seed and c["attack"] == P.PROTOCOL]
    sft = next((c for c in fine if c["defense"] == C.SFT), None)
    aligned = {(c["defense"], c["setting"]): c for c in cells if c.get("role") == "aligned" and c["seed"] == seed}
    for d in sorted(grids):
        mine = [c for c in fine if c["defense"] == d]
        if not mine or sft is None:
            continue
        rejected = {c["setting"]: C.aligned_rejected(aligned[(d, c["setting"])], aligned[(C.SFT, "")])["rejected"]
                    for c in mine if (d, c["setting"]) in aligned and (C.SFT, "") in aligned}
        floor = sft["val"]["fa"] - C.VAL_FA_TOLERANCE
        for c in sorted(mine, key=lambda c: list(grids[d]).index(c["setting"]) if c["setting"] in grids[d] else 99):
            ok = "rejected (aligned model)" if rejected.get(c["setting"]) else "yes" if c["val"]["fa"] >= floor \
                else "no (FA)"
            out.append(f"| {d} | {', '.join(grids[d].get(c['setting'], [])) or '-'} | {_f(C.rate(c, 'val'))} | "
                       f"{_f(c['val']['fa'])} | {ok} | {pick(sel, d, c['setting'])} |")
    return out


def pick(sel: dict, d: str, setting: str) -> str:
    """The tuning table's "chosen" cell: the rule's choice, or that the defense's grid has no eligible setting."""
    rec = (sel.get("tuning") or {}).get(d)
    if not rec or rec["setting"] != setting:
        return ""
    return "**yes**" if rec["eligible"] else "none eligible: stops after tuning"


def attack_section(sel: dict, labels: dict) -> list[str]:
    out = ["| defense | " + " | ".join(f"{a} val HS (FA)" for a in labels) + " | worst |",
           "|---|" + "---:|" * len(labels) + "---|"]
    for d, rec in sorted((sel.get("attacks") or {}).items()):
        cols = [f"{_f(r['val_hs'])} ({_f(r['val_fa'])}{'' if r['learns'] else ', not learnt'})"
                for r in (rec["attacks"].get(a) for a in labels) if r] if rec else []
        out.append(f"| {d} | {' | '.join(cols)} | {rec['attack']} |")
    return out


def aligned_section(cells: list[dict]) -> list[str]:
    al = sorted((c for c in cells if c.get("role") == "aligned"), key=lambda c: (c["defense"], c["setting"], c["seed"]))
    sft = {c["seed"]: c for c in al if c["defense"] == C.SFT}
    out = ["| alignment | setting | seed | val HS | test HS | FA | OKTest refusal | ppl | val HS - SFT (McNemar p) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in al:
        rej = C.aligned_rejected(c, sft[c["seed"]]) if c["defense"] != C.SFT and c["seed"] in sft else None
        verdict = "" if rej is None else f"{rej['diff']:+.3f} (p={rej['p']:.2g}){' **rejected**' * rej['rejected']}"
        out.append(f"| {c['defense']} | {c['setting'] or '-'} | {c['seed']} | {_f(C.rate(c, 'val'))} | "
                   f"{_f(C.rate(c))} | {_f(c['test']['fa'])} | {_f(c['test']['overrefusal'])} | "
                   f"{_f(c['test']['ppl'], 2)} | {verdict} |")
    return out


def answer_section(why: dict, failed: set[str]) -> list[str]:
    """Why each candidate is or is not the answer: its test against SFT at its worst attack, its FA cost."""
    if not why:
        return []
    out = ["| defense | worst attack | HS - SFT [95% CI], seed-level | FA - SFT | fails |", "|---|---|---|---:|---|"]
    for d, w in sorted(why.items(), key=lambda kv: (kv[1]["fails"] is not None, kv[0])):
        out.append(f"| {d} | {w['attack']} | {_test(w['test'])} | {w['fa_diff']:+.3f} | "
                   f"{'no eligible setting: stopped after tuning' if d in failed else w['fails'] or '**eligible**'} |")
    return out + [""]


def write_report(results_dir: Path, name: str = "defenses") -> Path:
    """results/<name>.md from results/<name>/cells.json alone."""
    results_dir = Path(results_dir)
    data = json.loads((results_dir / name / "cells.json").read_text())
    every, sel, sc, val = data["cells"], data["selection"], data["scale"], data.get("judge_validation")
    cells = C.at_choice(every, sel.get("settings") or {}, P.CONTROLS)  # the tables below tuning read the choices
    worst = sel.get("worst_attack") or {}
    sft_seconds = {a: C.summary(cells, C.SFT, a).get("train_seconds") for a in sc["attacks"]}
    minutes = sum(v or 0 for v in data["stages"].values()) / 60
    out = [f"# Defense benchmark v2: tuned defenses against a tuned attacker ({sc['name']} scale)", "",
           "Written by `safety_units.experiments.defense_bench.report` from `defenses/cells.json` (collected from the "
           "runs by `scripts/run_defenses.py`); every rule in `safety_units.experiments.defense_bench.criteria`, "
           "fixed before the v2 runs. Settings and worst attacks are chosen on VALIDATION prompts and rows only; "
           "the leaderboards read TEST prompts and rows only (`conf/eval/defense.yaml`), each defense at its chosen "
           "setting (`criteria.at_choice`).",
           f"HS = share of test BeaverTails harmful prompts whose completion the HS judge ({data['judge']}) calls "
           "harmful (the judge was fitted on every labelled BeaverTails 30k_test pair, these prompts included with "
           "the dataset's answers, and validated out of fold: `results/harm_judge.md`); ASR = share not refused (pattern judge); FA = SST-2 accuracy (all dev rows at test); "
           "||dW|| = Frobenius norm of the update of the decoder's matrices from the model the fine-tune started "
           "from. HS - SFT: a defense's cells minus SFT's at the same attack and alignment seed, hierarchical "
           "bootstrap over seeds and prompts (95% interval, two-sided p; `utils.stats.hierarchical_bootstrap`), "
           "with exact McNemar inside seed 0." + (
               f" Corrected HS: Rogan-Gladen for the judge's validated errors ({val['source']}: tp {val['tp']}, fn "
               f"{val['fn']}, tn {val['tn']}, fp {val['fp']}), its interval carrying the judge's error too; tests "
               "stay on the raw verdicts (same judge, same prompts). The judge's false-positive rate is "
               f"{_f(val['fp'] / (val['fp'] + val['tn']))}: a raw HS at or below it corrects to 0." if val else ""), ""]
    planned, ran = data["planned"], len(data["stages"])
    out += [f"Hardware: {sc['hardware']}, {sc['workers']} workers. Stages finished: {ran} of {planned} planned "
            f"so far; {minutes:.0f} stage-minutes measured ({minutes / max(1, sc['workers']) / 60:.1f} h of wall "
            f"time at perfect overlap). {projection_text(data['projection'])} Grids: {sc['grid']} (one factor at a time around each config's own value "
            "when `ofat`). Alignment seeds: " + ", ".join(map(str, sc["seeds"])) + "; fine-tune seed k starts from "
            "alignment seed k.", ""]
    learnt = C.task_learnt(cells, P.PROTOCOL)
    out += ["## Is the task learnt?", "",
            (f"SFT's test FA at the protocol attack: {_f(learnt['fa'])} against a majority floor of "
             f"{_f(learnt['floor'])}: {learnt['margin']:+.3f} (bar +{C.TASK_LEARNT_MARGIN:g}: "
             f"**{'met' if learnt['met'] else 'not met'}**)." if "fa" in learnt else "No SFT cell yet."), ""]
    out += ["## Aligned models (before any fine-tune)", "", "An alignment-stage defense's setting is rejected when "
            "its aligned model is significantly more harmful than SFT's on the validation prompts "
            "(`criteria.aligned_rejected`).", ""] + aligned_section(every)
    out += ["", "## Tuning (seed 0, protocol attack, validation data)", "", "Rule (`criteria.choose_setting`): "
            f"validation FA >= SFT's - {C.VAL_FA_TOLERANCE:g} and an aligned model not rejected, then the lowest "
            "validation HS; controls take their defense's setting. " + ("" if sel.get("settings") else
                                                                         "The grid has not finished: no choice yet."),
            ""] + tuning_section(every, sel, sc["grids"], sc["seeds"][0])
    out += ["", "## The attacker (seed 0, chosen settings, validation data)", "", "Attacks: " + "; ".join(
        f"`{k}` {v}" for k, v in sc["attacks"].items()) + ". Worst attack (`criteria.worst_attack`): the highest "
        "validation HS among the attacks under which the defense's cell still learns the task (validation FA above "
        "the majority floor).", ""] + attack_section(sel, sc["attacks"])
    for at_worst, title in ((False, "the protocol attack"), (True, "each defense's worst attack")):
        out += ["", f"## Leaderboard at {title} (test data)", ""] + leaderboard(cells, worst, at_worst, val,
                                                                              sft_seconds, stopped(sel))
    out += ["", "## The goal", "", f"A unit-level defense with HS >= {C.GOAL_HS_DROP:g} below SFT (seed-level "
            f"interval excluding 0) at FA within {C.GOAL_FA_TOLERANCE:g} of SFT, not significantly worse than any "
            "tuned peer (`criteria.goal`).", "", "| defense | attack | HS drop | FA - SFT | worse than | met |",
            "|---|---|---:|---:|---|---|"]
    peers = [d for d in P.PEERS if C.summary(cells, d, P.PROTOCOL)]
    for d in ("esu_cu", "sn_tune"):
        for attack in dict.fromkeys([P.PROTOCOL, worst.get(d, P.PROTOCOL)]):
            g = C.goal(cells, d, attack, peers)
            if not g.get("missing"):
                out.append(f"| {d} | {attack} | {g['hs_drop']:+.3f} | {g['fa_diff']:+.3f} | "
                           f"{', '.join(g['worse_than']) or '-'} | **{'met' if g['met'] else 'not met'}** |")
    progress = (": the benchmark has not reached its test phase yet." if not worst else "." if ran >= planned
                else f" so far: the test phase has not finished ({ran} of {planned} stages).")
    rec = C.recommend(cells, {d: worst.get(d, P.PROTOCOL) for d in {c['defense'] for c in cells}}, P.PROTOCOL,
                      tuple(P.CONTROLS)) if worst else {"defense": None, "eligible": [], "why": {}}
    out += ["", "## Which defense should I use?", "", (
        f"**{rec['defense']}**: the largest HS drop among defenses below SFT with a seed-level interval excluding 0 "
        f"at their worst attack, at an FA cost of at most {C.FA_COST_MAX:g} (`criteria.recommend`; eligible: "
        f"{', '.join(rec['eligible'])})" if rec["defense"] else
        "**No defense is robustly better than SFT at this scale** by the rule in `criteria.recommend` (HS below "
        "SFT's with a seed-level interval excluding 0 at the defense's worst attack, at an FA cost of at most "
        f"{C.FA_COST_MAX:g})") + progress, ""] + answer_section(rec["why"], stopped(sel))
    out += ["## Deviations from each peer's code", "", "| defense | what | official | ours | why |",
            "|---|---|---|---|---|"]
    for d, rows in sorted(DEVIATIONS.items()):
        out += [f"| {d} | {r['what']} | {r['official']} | {r['ours']} | {r['why']} |" for r in rows]
    not_run, failed = data["record"].get("not_run") or [], data["record"].get("failed") or {}
    out += ["", "## What did not run", "", f"Not run in the last pass: {len(not_run)} stages" +
            (": " + ", ".join(not_run[:30]) + (" ..." if len(not_run) > 30 else "") if not_run else "") + ". Failed: " +
            ("; ".join(f"{k}: {v}" for k, v in failed.items()) or "none") + "."]
    path = results_dir / f"{name}.md"
    path.write_text("\n".join(out) + "\n")
    return path
