"""The defense benchmark's stages: defenses x threat models x seeds on the shared harmful fine-tuning protocol
(Vaccine / Lisa / Booster / Antidote: an aligned model fine-tuned on SST-2 with a share p of harmful pairs; Qi et
al.'s harmful examples), run by the study runner (safety_units.experiments.study.runner: in memory, resumable by config hash,
worker processes, a time budget).

Stages, in run order (setup first, then the queue):
    align_sft, attribute_aligned                    setup: the SFT-aligned model and its unit map (wifv)
    align_vaccine, align_booster                    the alignment-stage defenses, from the shipped model
    attribute_mask                                  the aligned model's map by the best causal scorer (scoring=mask)
    align_sn_tune                                   SN-Tune-style re-alignment of the ESU of align_sft
    align_sft_timing                                align_sft again in a worker: the time reference of the alignments
    ft_<threat>_<defense>_s<seed>                   a fine-tune under the threat, evaluated (eval=defense)
A fine-tune starts from its defense's aligned model (align_<defense> for alignment-stage defenses, else align_sft).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from safety_units.experiments.study.plan import SHIPPED, Stage, common_overrides, one_epoch

BENCH_NAME = "defenses_smollm2"
SFT = "align_sft"

# defense -> (stage, the overrides of its fine-tune run). Alignment-stage defenses fine-tune with none; their
# effect is in the model they start from.
# run order within a seed: the alignment-stage defenses last, so that their models are ready when a worker
# reaches them (a stage whose model is still being aligned waits: safety_units.experiments.study.runner.wait_for)
DEFENSES = ("none", "esu_cu", "random", "lisa", "safeinstr", "safelora", "antidote", "layers", "esu",
            "mask_esu_cu", "scans_layers", "sn_tune", "vaccine", "booster")
ALIGN_DEFENSES = ("vaccine", "booster", "sn_tune")
UNIT_DEFENSES = ("esu", "esu_cu", "random", "mask_esu_cu", "sn_tune")  # layers: the safety-layer peer baseline
PEERS = ("vaccine", "booster", "lisa", "safeinstr", "layers", "safelora", "antidote")
# scans_layers: freeze=layers on the blocks SCANS anchors (steer=scans, issue 26): where steering meets freezing


@dataclass(frozen=True)
class Threat:
    key: str
    label: str
    family: str                     # task_mix | harmful_examples
    overrides: tuple[str, ...]
    strength: float | None = None   # p, or the number of harmful examples


@dataclass
class BenchScale:
    name: str
    hardware: str
    common: list[str]
    align: list[str]                # alignment runs (SFT and the alignment-stage defenses), from the shipped model
    sn_tune: list[str]              # SN-Tune's re-alignment of align_sft
    task_n: int                     # n of data=task_mix
    finetune: list[str]             # task_mix fine-tunes (batch, lr, epochs)
    shares: list[float]             # p of the full grid
    examples: list[int]             # harmful_examples sizes
    examples_ft: list[str]
    attribute: list[str]
    mask: list[str]
    eval: list[str]
    seeds: list[int]
    workers: int = 2
    base_model: list[str] = field(default_factory=lambda: ["model=smollm2_135m"])
    reduced: dict = field(default_factory=dict)  # threat key -> defenses run there (default: all)


# Qi et al.'s attack at the cpu scale, for a subset that keeps the scale within 3 hours on 2 cores (all 13 measured
# at ~3.5 h): SFT, ours and its control, and one peer per stage (Booster: the strongest anchor; Lisa; both
# post-hoc defenses). Chosen before any bad10 run.
BAD10_CPU = ("none", "esu_cu", "random", "lisa", "safelora", "antidote", "booster")


def one_epoch_steps(n: int, batch: int, epochs: int = 1) -> int:
    return math.ceil(n / batch) * epochs


SCALES = {
    # 2 CPU cores, float32, two one-thread workers: a 240-example alignment (30 steps), fine-tunes of 96
    # examples x 2 epochs (24 steps: one epoch of 64 left SST-2 at the majority class; one worker trains ~25-40
    # tokens/s) and Qi et al.'s 10 examples x 5 epochs; the full grid at p = 0.1 and 10 harmful examples, the
    # benign reference p = 0 for SFT only (run first: it shows that the task is learnt).
    "cpu": BenchScale(
        name="cpu", hardware="CPU (2 cores), float32, reduced sizes",
        common=common_overrides("cpu"),
        align=[*one_epoch(240, 128, 8, lr="2e-4", data="mix"), "export=true"],
        sn_tune=[*one_epoch(64, 128, 8, lr="2e-4", data="refusal_stl"), "export=true"],
        task_n=96,
        finetune=["data.max_length=96", "data.batch_size=8", "optim.lr=2e-4", "trainer.max_epochs=2"],
        shares=[0.0, 0.1],
        examples=[10],
        examples_ft=["data.max_length=160", "data.batch_size=5", "optim.lr=5e-5", "trainer.max_epochs=5"],
        attribute=["scoring=wifv", "calibration.nsamples=64", "calibration.max_length=128"],
        mask=["scoring=mask", "calibration.nsamples=32", "calibration.batch_size=4", "calibration.max_length=128"],
        eval=["eval=defense", "eval.tasks.beavertails.limit=64", "eval.tasks.oktest.limit=32",
              "eval.tasks.sst2.limit=200", "eval.tasks.ppl.limit=24", "eval.max_new_tokens=48"],
        seeds=[0, 1, 2], workers=2, reduced={"mix00": ("none",), "bad10": BAD10_CPU}),
    # One GPU (never run here: no GPU was lent to this issue): the protocol's n = 1000 at p = 0.1, 10 harmful
    # examples, p = 0 for SFT, with the study gpu scale's batch sizes, pooled decoding and 3 workers;
    # benchmarks/project_defense_time.py projects it from the study's measured H100 stages (a first GPU run must
    # measure it against the 10-minute goal).
    # gpu_full: every p of the protocol and 10 / 50 / 100 examples for every defense.
    "gpu": BenchScale(
        name="gpu", hardware="one GPU, bf16-mixed",
        common=common_overrides("gpu"),
        align=[*one_epoch(2000, 256, 16, lr="5e-5", data="mix"), "export=true"],
        sn_tune=[*one_epoch(256, 256, 16, lr="5e-5", data="refusal_stl"), "export=true"],
        task_n=1000,
        finetune=["data.max_length=256", "data.batch_size=32", "optim.lr=1e-4", "trainer.max_epochs=1"],
        shares=[0.0, 0.1],
        examples=[10],
        examples_ft=["data.max_length=256", "data.batch_size=10", "optim.lr=5e-5", "trainer.max_epochs=5"],
        attribute=["scoring=wifv", "calibration.nsamples=128", "calibration.max_length=256"],
        mask=["scoring=mask", "calibration.nsamples=64", "calibration.max_length=256"],
        eval=["eval=defense", "eval.tasks.beavertails.limit=500", "eval.tasks.oktest.limit=100",
              "eval.tasks.sst2.limit=null", "eval.tasks.ppl.limit=100", "eval.batch_size=256",
              "+eval.pool_generation=true"],
        seeds=[0, 1, 2], workers=3, reduced={"mix00": ("none",)}),
}
SCALES["gpu_full"] = replace(SCALES["gpu"], name="gpu_full", shares=[0.0, 0.05, 0.1, 0.2], examples=[10, 50, 100],
                             reduced={})


def threats(scale: BenchScale) -> list[Threat]:
    """p = 0.1 and the smallest harmful-examples set first (the leaderboard's), then the rest of the grid."""
    mix = [Threat(f"mix{round(100 * p):02d}", f"SST-2 + harmful p={p:g}", "task_mix",
                  ("data=task_mix", f"data.harmful_share={p}", f"data.num_samples={scale.task_n}", *scale.finetune),
                  strength=p) for p in scale.shares]
    bad = [Threat(f"bad{k}", f"{k} harmful examples", "harmful_examples",
                  ("data=harmful_examples", f"data.num_samples={k}", *scale.examples_ft), strength=k)
           for k in scale.examples]
    first = [t for t in mix if t.strength == 0.1] + bad[:1]
    return first + [t for t in mix + bad if t not in first]


def finetune_steps(threat: Threat) -> int:
    over = dict(o.split("=", 1) for o in threat.overrides)
    return one_epoch_steps(int(over["data.num_samples"]), int(over["data.batch_size"]),
                           int(over.get("trainer.max_epochs", 1)))


def defense_overrides(defense: str, threat: Threat, seed: int, study_dir: str) -> tuple[str, list[str]]:
    """(the stage the fine-tune starts from, the fine-tune's defense overrides)."""
    wifv = f"{study_dir}/attribute_aligned/unit_map.safetensors"
    if defense in ALIGN_DEFENSES:
        return f"align_{defense}", ["defense=none"]
    if defense == "mask_esu_cu":
        return SFT, ["defense=esu_cu", f"freeze.unit_map={study_dir}/attribute_mask/unit_map.safetensors",
                     f"freeze.seed={seed}"]
    if defense in ("esu", "esu_cu", "random", "layers"):
        extra = {"random": ["freeze.like=esu_cu"], "layers": ["freeze.layers_like=esu_cu"]}.get(defense, [])
        return SFT, [f"defense={defense}", f"freeze.unit_map={wifv}", f"freeze.seed={seed}", *extra]
    if defense == "scans_layers":
        return SFT, ["defense=layers", "freeze.layers_like=scans"]
    if defense == "lisa":  # the code's 100 : 900 alignment : fine-tune split, over this run's steps
        steps = finetune_steps(threat)
        a = max(1, round(0.1 * steps))
        return SFT, ["defense=lisa", f"defense.alignment_steps={a}", f"defense.finetune_steps={max(1, steps - a)}"]
    return SFT, [f"defense={defense}"]


def model_of(key: str, study_dir: str, scale: BenchScale) -> list[str]:
    return list(scale.base_model) if key == SHIPPED else ["model=hf", f"model.path={study_dir}/{key}/model"]


def plan(scale: BenchScale, study_dir: str) -> list[Stage]:
    """Every stage of the benchmark at `scale`, in run order; paths point into `study_dir`."""
    ev = list(scale.eval)
    base = [*scale.base_model, *scale.common]
    stages = [
        Stage(SFT, "align", SHIPPED, train=[*base, *scale.align, "defense=none", "seed=0"], evaluate=ev,
              labels={"claim": "setup", "role": "aligned", "defense": "none"}),
        Stage("attribute_aligned", "attribute", SFT, attribute=[*model_of(SFT, study_dir, scale), *scale.attribute],
              labels={"claim": "setup"}),
    ]
    for d in ("vaccine", "booster"):
        stages.append(Stage(f"align_{d}", "align", SHIPPED, train=[*base, *scale.align, f"defense={d}", "seed=0"],
                            evaluate=ev, labels={"claim": "align", "role": "aligned", "defense": d}))
    stages.append(Stage("attribute_mask", "attribute", SFT,
                        attribute=[*model_of(SFT, study_dir, scale), *scale.mask], labels={"claim": "align"}))
    stages.append(Stage("align_sn_tune", "align", SFT,
                        train=[*model_of(SFT, study_dir, scale), *scale.common, *scale.sn_tune, "defense=sn_tune",
                               f"freeze.unit_map={study_dir}/attribute_aligned/unit_map.safetensors", "seed=0"],
                        evaluate=ev, labels={"claim": "align", "role": "aligned", "defense": "sn_tune"}))
    # align_sft ran alone in the main process; the alignment defenses ran in a worker beside another: their time
    # ratio needs an SFT alignment timed like them (same overrides, not exported, evaluated like every stage)
    stages.append(Stage("align_sft_timing", "train_eval", SHIPPED,
                        train=[*base, *scale.align, "export=false", "defense=none", "seed=0"], evaluate=ev,
                        labels={"claim": "align", "role": "timing", "defense": "none"}))
    for threat in sorted(threats(scale), key=lambda t: len(scale.reduced.get(t.key, DEFENSES)) > 1):  # SFT-only refs first
        chosen = scale.reduced.get(threat.key, DEFENSES)
        for seed in scale.seeds:
            for d in chosen:
                start, over = defense_overrides(d, threat, seed, study_dir)
                needs = [f"{start}/model/config.json"] if start != SFT else []
                if d == "mask_esu_cu":
                    needs.append("attribute_mask/unit_map.safetensors")
                stages.append(Stage(
                    f"ft_{threat.key}_{d}_s{seed}", "train_eval", start,
                    train=[*model_of(start, study_dir, scale), *scale.common, *threat.overrides, *over,
                           f"seed={seed}"],
                    evaluate=ev, needs=needs,
                    labels={"claim": "finetune", "threat": threat.key, "threat_label": threat.label,
                            "family": threat.family, "strength": threat.strength, "defense": d, "seed": seed}))
    return stages
