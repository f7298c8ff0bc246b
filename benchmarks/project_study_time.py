"""Project the wall time of `run_study.py --scale <scale>` from stages measured on the same kind of machine.

    python benchmarks/project_study_time.py                       # the gpu plan, from results/ssah_smollm2
    python benchmarks/project_study_time.py --workers 1

A stage's seconds are modelled as  fixed + steps * t_step + passes * t_pass:
* t_pass: one batched decoding pass of the refusal prompts (tqdm's s/it of the eval tasks in the device log);
* fixed + steps * t_step: the rest of a training stage, fitted on the logged (c) stages (their step counts come
  from the batch sizes they ran with: `--old-batch`, `--old-aoa-batch`); an eval-only stage's fixed part from the (b) stages' stage.json;
* the setup stages cost what they measured.
The plan being projected may use other batch sizes. Two bounds: "latency-bound" (a step or a decoding pass costs the
same at any batch size -- a 135M model on an H100: the measured oktest pass of 100 prompts took as long as a harmful
pass of 128) and "compute-bound" (cost proportional to the batch). Workers sharing one GPU are not measured: the
table gives one process, and the ideal W-worker time (the stages after the setup divided by W) as a lower bound.
Every input is read from the artifacts; nothing here is a hand-written timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.data.sources import Source
from safety_units.experiments.study.plan import SCALES, plan
from safety_units.experiments.study.runner import stage_configs

RUN = re.compile(r"\[run \] (\S+)")
DONE = re.compile(r"done in ([0-9.]+) s")
PASS = re.compile(r"(harmful|oktest): 100%\|[^|]*\| (\d+)/\d+ \[[^,]*,\s+([0-9.]+)s/it\]")


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


def measured_costs(args) -> dict:
    """t_pass, t_step, the fixed seconds of a training and of an eval stage, fitted on the study's H100 artifacts
    (see the module docstring); also the stage seconds and the refusal task sizes they ran with."""
    scale = SCALES["gpu"]
    seconds = {p.name[:-len(".stage.json")]: json.loads(p.read_text())["seconds"]
               for p in args.runs.glob("*.stage.json")}
    task_sizes = {t: json.loads((args.runs / "shipped" / "eval.json").read_text())[t]["n"] for t in ("harmful", "oktest")}
    logged = read_log(args.log)
    first = next(iter(logged))  # the process's first stage also loads the models: not a steady-state cost
    timed = {n: s for n, s in logged.items() if n != first and n.startswith("c_") and "seconds" in s}
    if not timed:
        sys.exit(f"{args.log}: no timed (c) stage after the first")
    t_pass = mean(rate for s in timed.values() for _, rate in s["passes"].values())
    stages = plan(scale, str(args.runs))
    by_name = {st.name: st for st in stages}
    rest = {}  # (c) stage -> seconds without its decoding passes, by its steps under the old batch
    for n, s in timed.items():
        cfg = stage_configs(by_name[n], args.runs, scale, [])["train"]
        old_batch = args.old_batch if cfg.data.get("num_samples") else args.old_aoa_batch
        steps = math.ceil(train_examples(cfg) / old_batch) * int(cfg.trainer.max_epochs)
        rest[n] = (steps, s["seconds"] - sum(k * rate for k, rate in s["passes"].values()))
    xs, ys = zip(*rest.values())
    if len(set(xs)) < 2:
        sys.exit("the logged (c) stages need two different step counts to fit t_step")
    mx, my = mean(xs), mean(ys)
    t_step = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed_train = my - t_step * mx
    b = [v for n, v in seconds.items() if n.startswith("b_")]
    fixed_eval = mean(b) - t_pass * sum(math.ceil(n / args.old_eval_batch) for n in task_sizes.values())
    return {"t_pass": t_pass, "t_step": t_step, "fixed_train": fixed_train, "fixed_eval": fixed_eval,
            "seconds": seconds, "task_sizes": task_sizes}


def arguments(argv=None, doc=__doc__, scales=SCALES):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="gpu", choices=sorted(scales))
    ap.add_argument("--runs", type=Path, default=ROOT / "results" / "ssah_smollm2" / "runs")
    ap.add_argument("--log", type=Path, default=ROOT / "results" / "ssah_smollm2" / "device_timing_c_stages.log")
    ap.add_argument("--old-batch", type=int, default=16, help="training batch of the logged stages")
    ap.add_argument("--old-aoa-batch", type=int, default=10, help="AOA's training batch in the logged stages")
    ap.add_argument("--old-eval-batch", type=int, default=128, help="eval batch of the measured stages")
    ap.add_argument("--workers", type=int, help="default: the scale's")
    return ap.parse_args(argv)


def main(argv=None):
    args = arguments(argv)
    scale = SCALES[args.scale]
    workers = args.workers or scale.workers
    c = measured_costs(args)
    t_pass, t_step, fixed_train, fixed_eval = c["t_pass"], c["t_step"], c["fixed_train"], c["fixed_eval"]
    seconds, task_sizes = c["seconds"], c["task_sizes"]
    stages = plan(scale, str(args.runs))
    print(f"measured: t_pass {t_pass:.2f} s, t_step {t_step:.3f} s (batch {args.old_batch}), fixed {fixed_train:.2f} s "
          f"a training stage / {fixed_eval:.2f} s an eval stage; setup stages as measured")
    groups: dict[str, list[float]] = {}
    setup = [st.name for st in stages if st.labels.get("claim") == "setup"]
    for st in stages:
        if st.name in setup:  # as measured
            groups[st.name] = [seconds[st.name], seconds[st.name], 1]
            continue
        g = st.name[0]
        w = stage_work(st, args.runs, scale, task_sizes)
        fixed = fixed_train if w["steps"] else fixed_eval
        batch_ratio = w["batch"] / args.old_batch if w["steps"] else 0
        lat = fixed + w["steps"] * t_step + w["passes"] * t_pass
        comp = fixed + w["steps"] * t_step * max(1.0, batch_ratio) + \
            w["passes"] * t_pass * max(1.0, w["prompts_per_pass"] / args.old_eval_batch)
        acc = groups.setdefault(g, [0.0, 0.0, 0])
        acc[0], acc[1], acc[2] = acc[0] + lat, acc[1] + comp, acc[2] + 1
    print(f"\n--scale {args.scale}: projected minutes, one process")
    print("| stages | n | latency-bound | compute-bound |\n|---|---:|---:|---:|")
    for g, (lat, comp, n) in groups.items():
        print(f"| {g} | {n} | {lat / 60:.1f} | {comp / 60:.1f} |")
    setup_s = [sum(groups[g][i] for g in setup) for i in (0, 1)]
    total = [sum(v[i] for v in groups.values()) for i in (0, 1)]
    print(f"| total | {sum(v[2] for v in groups.values())} | {total[0] / 60:.1f} | {total[1] / 60:.1f} |")
    for i, label in enumerate(("latency-bound", "compute-bound")):
        ideal = (setup_s[i] + (total[i] - setup_s[i]) / workers) / 60
        print(f"{label}: {total[i] / 60:.1f} min in one process; with {workers} workers sharing the GPU, "
              f"at best {ideal:.1f} min (unmeasured: perfect overlap)")


if __name__ == "__main__":
    main()
