"""Project the wall time of `run_study.py --scale <scale>` and of `run_defenses.py --scale gpu|gpu_full` on an H100
from the study's stages measured there (benchmarks/project_study_time.py and project_defense_time.py are the
command lines). Every input is read from the artifacts (results/ssah_smollm2/runs and its device log); nothing
here is a hand-written timing, and nothing is a measurement: a first GPU run must time it.

A stage's seconds are modelled as  fixed + steps * t_step + passes * t_pass:
* t_pass: one batched decoding pass of the refusal prompts (tqdm's s/it of the eval tasks in the device log);
* fixed + steps * t_step: the rest of a training stage, fitted on the logged (c) stages (their step counts come
  from the batch sizes they ran with: `old_batch`, `old_aoa_batch`); an eval-only stage's fixed part from the (b)
  stages' stage.json;
* the study's setup stages cost what they measured.
The plan being projected may use other batch sizes. Two bounds for the study: "latency-bound" (a step or a decoding
pass costs the same at any batch size -- a 135M model on an H100: the measured oktest pass of 100 prompts took as
long as a harmful pass of 128) and "compute-bound" (cost proportional to the batch). Workers sharing one GPU are
not measured: the tables give one process, and the ideal W-worker time (the stages after the setup divided by W)
as a lower bound.

The defense benchmark (latency-bound): steps = examples / batch x epochs, times 2 for Vaccine's and 3 for
Booster's alignment steps (their forward/backward passes); decoding passes of the pooled refusal prompts; the label
task's and perplexity's forward passes at one decoding step each (a pass generates max_new_tokens tokens); the mask
attribution's optimizer steps. Post-hoc defenses' own work (a projection per matrix, one harmful calibration pass)
is not modelled.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from safety_units.data.sources import Source
from safety_units.experiments.defense_bench import plan as defense_plan
from safety_units.experiments.study import plan as study_plan
from safety_units.experiments.study.runner import stage_configs
from safety_units.utils.errors import ConfigError

RUN = re.compile(r"\[run \] (\S+)")
DONE = re.compile(r"done in ([0-9.]+) s")
PASS = re.compile(r"(harmful|oktest): 100%\|[^|]*\| (\d+)/\d+ \[[^,]*,\s+([0-9.]+)s/it\]")
PASSES_PER_STEP = {"vaccine": 2, "booster": 3}  # the defenses' forward/backward passes per alignment step


@dataclass
class Measured:
    """Where the measured stages are and the batch sizes they ran with."""

    runs: Path
    log: Path
    old_batch: int = 16       # training batch of the logged stages
    old_aoa_batch: int = 10   # AOA's training batch in the logged stages
    old_eval_batch: int = 128  # eval batch of the measured stages

    @classmethod
    def from_args(cls, args) -> Measured:
        return cls(args.runs, args.log, args.old_batch, args.old_aoa_batch, args.old_eval_batch)


def projection_parser(doc: str, scales, study_results: Path) -> argparse.ArgumentParser:
    """The command line of both projections (as experiments.study.cli is the runners'): the scale, the measured
    artifacts (in `study_results`: runs/ and the device log) and the batch sizes they ran with."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="gpu", choices=sorted(scales))
    ap.add_argument("--runs", type=Path, default=study_results / "runs")
    ap.add_argument("--log", type=Path, default=study_results / "device_timing_c_stages.log")
    ap.add_argument("--old-batch", type=int, default=16, help="training batch of the logged stages")
    ap.add_argument("--old-aoa-batch", type=int, default=10, help="AOA's training batch in the logged stages")
    ap.add_argument("--old-eval-batch", type=int, default=128, help="eval batch of the measured stages")
    ap.add_argument("--workers", type=int, help="default: the scale's")
    return ap


def projection_cli(doc: str, scales, project, study_results: Path, argv: list[str] | None = None) -> str:
    """The command line of benchmarks/project_*_time.py: parse (projection_parser), then print and return
    project(measured stages, scale, workers)."""
    args = projection_parser(doc, scales, study_results).parse_args(argv)
    text = project(Measured.from_args(args), args.scale, args.workers)
    print(text)
    return text


def read_log(path: Path) -> dict[str, dict]:
    """Per stage of a device log: seconds, and the decoding passes of its refusal tasks with their s/it."""
    stages, name = {}, None
    for line in path.read_text().replace("\r", "\n").splitlines():
        if m := RUN.search(line):
            name = m.group(1)
            stages[name] = {"passes": {}}
        for m in PASS.finditer(line):
            stages[name]["passes"][m.group(1)] = (int(m.group(2)), float(m.group(3)))
        if (m := DONE.search(line)) and name:
            stages[name]["seconds"] = float(m.group(1))
    return stages


def train_examples(cfg) -> int:
    if cfg.data.get("num_samples"):
        return int(cfg.data.num_samples)
    return sum(len(Source.from_config(src, key).load(int(cfg.seed))) for key, src in cfg.data.sources.items())


def stage_work(stage, study: Path, scale, task_sizes: dict[str, int]) -> dict:
    """Optimizer steps, their batch size, and decoding passes of one stage of the projected plan."""
    cfgs = stage_configs(stage, study, scale, [])
    ev = cfgs["evaluate"].eval
    bs_eval = int(ev.batch_size)
    sizes = [task_sizes[t] for t, task in ev.tasks.items() if task is not None and task.get("type") == "refusal"]
    passes = math.ceil(sum(sizes) / bs_eval) if ev.get("pool_generation") else sum(math.ceil(n / bs_eval) for n in sizes)
    out = {"passes": passes, "prompts_per_pass": sum(sizes) / max(1, passes), "steps": 0, "batch": 0}
    if "train" in cfgs:
        t = cfgs["train"]
        out["batch"] = int(t.data.batch_size)
        out["steps"] = math.ceil(train_examples(t) / out["batch"]) * int(t.trainer.max_epochs)
    return out


def measured_costs(m: Measured) -> dict:
    """t_pass, t_step, the fixed seconds of a training and of an eval stage, fitted on the study's H100 artifacts
    (see the module docstring); also the stage seconds and the refusal task sizes they ran with."""
    scale = study_plan.SCALES["gpu"]
    seconds = {p.name[:-len(".stage.json")]: json.loads(p.read_text())["seconds"] for p in m.runs.glob("*.stage.json")}
    task_sizes = {t: json.loads((m.runs / "shipped" / "eval.json").read_text())[t]["n"] for t in ("harmful", "oktest")}
    logged = read_log(m.log)
    first = next(iter(logged))  # the process's first stage also loads the models: not a steady-state cost
    timed = {n: s for n, s in logged.items() if n != first and n.startswith("c_") and "seconds" in s}
    if not timed:
        raise ConfigError(f"{m.log}: no timed (c) stage after the first")
    t_pass = mean(rate for s in timed.values() for _, rate in s["passes"].values())
    by_name = {st.name: st for st in study_plan.plan(scale, str(m.runs))}
    rest = {}  # (c) stage -> seconds without its decoding passes, by its steps under the old batch
    for n, s in timed.items():
        cfg = stage_configs(by_name[n], m.runs, scale, [])["train"]
        old_batch = m.old_batch if cfg.data.get("num_samples") else m.old_aoa_batch
        steps = math.ceil(train_examples(cfg) / old_batch) * int(cfg.trainer.max_epochs)
        rest[n] = (steps, s["seconds"] - sum(k * rate for k, rate in s["passes"].values()))
    xs, ys = zip(*rest.values())
    if len(set(xs)) < 2:
        raise ConfigError(f"{m.log}: the logged (c) stages need two different step counts to fit t_step")
    mx, my = mean(xs), mean(ys)
    t_step = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed_train = my - t_step * mx
    b = [v for n, v in seconds.items() if n.startswith("b_")]
    fixed_eval = mean(b) - t_pass * sum(math.ceil(n / m.old_eval_batch) for n in task_sizes.values())
    return {"t_pass": t_pass, "t_step": t_step, "fixed_train": fixed_train, "fixed_eval": fixed_eval,
            "seconds": seconds, "task_sizes": task_sizes}


def project_study(m: Measured, scale_name: str, workers: int | None = None) -> str:
    """The study's projected minutes per stage group, both bounds, one process and the ideal W workers."""
    scale = study_plan.SCALES[scale_name]
    workers = workers or scale.workers
    c = measured_costs(m)
    t_pass, t_step, fixed_train, fixed_eval = c["t_pass"], c["t_step"], c["fixed_train"], c["fixed_eval"]
    stages = study_plan.plan(scale, str(m.runs))
    lines = [f"measured: t_pass {t_pass:.2f} s, t_step {t_step:.3f} s (batch {m.old_batch}), fixed {fixed_train:.2f} s "
             f"a training stage / {fixed_eval:.2f} s an eval stage; setup stages as measured"]
    groups: dict[str, list[float]] = {}
    setup = [st.name for st in stages if st.labels.get("claim") == "setup"]
    for st in stages:
        if st.name in setup:  # as measured
            groups[st.name] = [c["seconds"][st.name], c["seconds"][st.name], 1]
            continue
        w = stage_work(st, m.runs, scale, c["task_sizes"])
        fixed = fixed_train if w["steps"] else fixed_eval
        batch_ratio = w["batch"] / m.old_batch if w["steps"] else 0
        lat = fixed + w["steps"] * t_step + w["passes"] * t_pass
        comp = fixed + w["steps"] * t_step * max(1.0, batch_ratio) + \
            w["passes"] * t_pass * max(1.0, w["prompts_per_pass"] / m.old_eval_batch)
        acc = groups.setdefault(st.name[0], [0.0, 0.0, 0])
        acc[0], acc[1], acc[2] = acc[0] + lat, acc[1] + comp, acc[2] + 1
    lines += [f"\n--scale {scale_name}: projected minutes, one process",
              "| stages | n | latency-bound | compute-bound |\n|---|---:|---:|---:|"]
    lines += [f"| {g} | {n} | {lat / 60:.1f} | {comp / 60:.1f} |" for g, (lat, comp, n) in groups.items()]
    setup_s = [sum(groups[g][i] for g in setup) for i in (0, 1)]
    total = [sum(v[i] for v in groups.values()) for i in (0, 1)]
    lines.append(f"| total | {sum(v[2] for v in groups.values())} | {total[0] / 60:.1f} | {total[1] / 60:.1f} |")
    for i, label in enumerate(("latency-bound", "compute-bound")):
        ideal = (setup_s[i] + (total[i] - setup_s[i]) / workers) / 60
        lines.append(f"{label}: {total[i] / 60:.1f} min in one process; with {workers} workers sharing the GPU, "
                     f"at best {ideal:.1f} min (unmeasured: perfect overlap)")
    return "\n".join(lines)


def eval_seconds(ev, c: dict) -> float:
    """An eval=defense evaluation: its refusal prompts in decoding passes, its label and perplexity rows in forwards
    (a forward costs one decoding step: t_pass / max_new_tokens)."""
    bs = int(ev.batch_size)
    refusal = sum(int(t.limit) for t in ev.tasks.values() if t is not None and t.get("type") == "refusal")
    forwards = sum(math.ceil(int(t.limit or 872) / bs) for t in ev.tasks.values()
                   if t is not None and t.get("type") in ("label", "ppl"))
    return c["fixed_eval"] + math.ceil(refusal / bs) * c["t_pass"] + forwards * c["t_pass"] / int(ev.max_new_tokens)


def defense_stage_cost(stage, bench: Path, scale, c: dict) -> float:
    """Projected seconds of one defense-benchmark stage (latency-bound: a step or a pass costs the same at any
    batch size)."""
    cfgs = stage_configs(stage, bench, scale, [])
    if stage.kind == "posthoc":  # an edit of a fine-tuned model, then its evaluation: no training steps
        return eval_seconds(cfgs["evaluate"].eval, c)
    if stage.kind == "attribute":
        steps = int(cfgs["attribute"].scoring.get("steps") or 0)
        return c["fixed_eval"] + steps * c["t_step"]
    seconds = eval_seconds(cfgs["evaluate"].eval, c)
    t = cfgs["train"]
    steps = math.ceil(int(t.data.num_samples) / int(t.data.batch_size)) * int(t.trainer.max_epochs)
    return seconds + c["fixed_train"] + steps * PASSES_PER_STEP.get(t.defense.name, 1) * c["t_step"]


def project_defenses(m: Measured, scale_name: str, workers: int | None = None) -> str:
    """The defense benchmark's projected minutes, one process and the ideal W workers."""
    scale = defense_plan.SCALES[scale_name]
    workers = workers or scale.workers
    c = measured_costs(m)
    bench = Path("/projected")
    stages = defense_plan.full_plan(scale, str(bench))
    setup = {"align_sft_s0", "attribute_s0"}
    cost = {s.name: defense_stage_cost(s, bench, scale, c) for s in stages}
    head = sum(v for k, v in cost.items() if k in setup)
    rest = sum(v for k, v in cost.items() if k not in setup)
    return "\n".join([
        f"measured (study, H100): t_pass {c['t_pass']:.2f} s, t_step {c['t_step']:.3f} s, fixed "
        f"{c['fixed_train']:.2f} s a training stage / {c['fixed_eval']:.2f} s an eval stage",
        f"--scale {scale_name}: {len(stages)} stages (every phase, each defense's worst attack not the protocol's); projected {(head + rest) / 60:.1f} min in one process; with "
        f"{workers} workers sharing the GPU, at best {(head + rest / workers) / 60:.1f} min (perfect overlap, "
        f"unmeasured); the longest stage {max(cost, key=cost.get)} {max(cost.values()) / 60:.1f} min"])
