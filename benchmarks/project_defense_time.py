"""Project the wall time of `run_defenses.py --scale gpu|gpu_full` on an H100 from the study's measured H100 stages.

    python benchmarks/project_defense_time.py                  # the gpu scale
    python benchmarks/project_defense_time.py --scale gpu_full

The per-stage costs (a fixed part, an optimizer step, a decoding pass) are fitted by benchmarks/project_study_time.py
on the study's artifacts (results/ssah_smollm2/); here they are applied to the defense benchmark's stages: steps =
examples / batch x epochs, times 2 for Vaccine's and 3 for Booster's alignment steps (their forward/backward
passes); decoding passes of the pooled refusal prompts; the label task's and perplexity's forward passes at one
decoding step each (a pass generates max_new_tokens tokens); the mask attribution's optimizer steps. Post-hoc
defenses' own work (a projection per matrix, one harmful calibration pass) is not modelled. Not a measurement:
a first GPU run must time it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import project_study_time as study_time  # noqa: E402  (a script module beside this one)

from safety_units.experiments.defense_bench.plan import SCALES, plan  # noqa: E402
from safety_units.experiments.study.runner import stage_configs  # noqa: E402

PASSES_PER_STEP = {"vaccine": 2, "booster": 3}


def stage_cost(stage, bench: Path, scale, c: dict) -> float:
    """Projected seconds of one stage (latency-bound: a step or a pass costs the same at any batch size)."""
    cfgs = stage_configs(stage, bench, scale, [])
    if stage.kind == "attribute":
        steps = int(cfgs["attribute"].scoring.get("steps") or 0)
        return c["fixed_eval"] + steps * c["t_step"]
    ev = cfgs["evaluate"].eval
    bs = int(ev.batch_size)
    refusal = sum(int(t.limit) for t in ev.tasks.values() if t is not None and t.get("type") == "refusal")
    forwards = sum(math.ceil(int(t.limit or 872) / bs) for t in ev.tasks.values()
                   if t is not None and t.get("type") in ("label", "ppl"))
    seconds = c["fixed_eval"] + math.ceil(refusal / bs) * c["t_pass"] + forwards * c["t_pass"] / int(ev.max_new_tokens)
    t = cfgs["train"]
    steps = math.ceil(int(t.data.num_samples) / int(t.data.batch_size)) * int(t.trainer.max_epochs)
    return seconds + c["fixed_train"] + steps * PASSES_PER_STEP.get(t.defense.name, 1) * c["t_step"]


def main(argv=None):
    args = study_time.arguments(argv, __doc__, SCALES)
    scale = SCALES[args.scale]
    workers = args.workers or scale.workers
    c = study_time.measured_costs(args)
    bench = Path("/projected")
    stages = plan(scale, str(bench))
    setup = {"align_sft", "attribute_aligned"}
    cost = {s.name: stage_cost(s, bench, scale, c) for s in stages}
    head = sum(v for k, v in cost.items() if k in setup)
    rest = sum(v for k, v in cost.items() if k not in setup)
    print(f"measured (study, H100): t_pass {c['t_pass']:.2f} s, t_step {c['t_step']:.3f} s, fixed {c['fixed_train']:.2f} "
          f"s a training stage / {c['fixed_eval']:.2f} s an eval stage")
    print(f"--scale {args.scale}: {len(stages)} stages; projected {(head + rest) / 60:.1f} min in one process; with "
          f"{workers} workers sharing the GPU, at best {(head + rest / workers) / 60:.1f} min (perfect overlap, "
          f"unmeasured); the longest stage {max(cost, key=cost.get)} {max(cost.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
