"""The SSAH study, v2: every stage (what runs, on which model, with which overrides) at two scales.

A stage is one directory under the study dir. Its kinds:
* `attribute`: attribute.py on a model (unit_map.safetensors);
* `align`: train.py from the shipped model, exported (model/), then evaluated -- the aligned model of (b), (c);
* `train_eval`: train.py on an in-memory copy of a model (not exported), then evaluated: (a) and (c);
* `eval`: evaluate.py on an in-memory copy of a model, optionally ablating units: references and (b).

Every evaluated stage writes eval.json (eval=study: ASR on the AdvBench eval half, over-refusal on OKTest,
held-out perplexity of both fine-tune tasks) and point.json (its labels and, for training stages, what trained).
Names, in the order the stages run (cheap and upstream first, so a time budget cuts the end of (c), never a base):
    attribute_base, align, shipped, attribute_aligned, aligned_aoaprompt,
    b_<cls>, b_random_<cls>_s<k>                             claim (b): ablate a class vs its size-matched random sets
    a_<method>[_<objective>]_lr<lr>_s<seed>                  claim (a): full / ru_only / random (like ru_only), per objective
    c_<threat>_<freeze>_s<seed>                              claim (c): threat models x freezes x seeds
"""

from __future__ import annotations

from dataclasses import dataclass, field

STUDY_NAME = "ssah_smollm2_v2"
SHIPPED, ALIGNED = "shipped", "aligned"  # model keys a stage starts from

FREEZES = ("none", "esu", "esu_cu", "random", "layers")
FREEZE_OVERRIDES = {
    "none": ["freeze=none"],
    "esu": ["freeze=esu"],
    "esu_cu": ["freeze=esu_cu"],
    # the controls: a random unit set of esu_cu's size, and whole middle layers with as many entries
    "random": ["freeze=random", "freeze.like=esu_cu"],
    "layers": ["freeze=layers", "freeze.layers_like=esu_cu"],
}
ALIGN_METHODS = ("full", "ru_only", "random")
ALIGN_OVERRIDES = {"full": ["freeze=none"], "ru_only": ["freeze=ru_only"],
                   "random": ["freeze=random", "freeze.like=ru_only"]}
ABLATED = ("esu", "euu", "cu", "ru")
# claim (a)'s objective axis (Jain et al.'s three methods): the data each objective trains on, instead of data=mix
OBJECTIVE_DATA = {"sft": "mix", "dpo": "preference", "unlearning": "unlearning"}


def a_name(method: str, lr: str, seed: int, objective: str = "sft") -> str:
    """Claim (a)'s stage name (SFT keeps the v2 names, so its finished stages are reused)."""
    return f"a_{method}_lr{lr}_s{seed}" if objective == "sft" else f"a_{method}_{objective}_lr{lr}_s{seed}"


def a_objectives(scale) -> dict[str, list[str]]:
    """objective -> the learning rates its (a) stages run at (a scale without the axis: SFT at a_lrs)."""
    objs = list(getattr(scale, "a_objectives", None) or ["sft"])
    other = list(getattr(scale, "a_objective_lrs", None) or scale.a_lrs)
    return {o: (list(scale.a_lrs) if o == "sft" else other) for o in objs}
@dataclass(frozen=True)
class Threat:
    """A fine-tuning threat model of claim (c)."""
    key: str
    label: str
    family: str                 # benign | harmful_mix | aoa
    utility_task: str           # the eval task measuring the fine-tune's own held-out utility
    overrides: tuple[str, ...]
    strength: float | None = None  # p for harmful_mix, epochs for aoa


@dataclass
class Scale:
    """Sizes of one scale; every list is overrides of the entry point's config."""
    name: str
    hardware: str
    common: list[str]           # every train stage
    align: list[str]            # the aligned model (claims b, c)
    budget_align: list[str]     # the alignment runs of claim (a)
    a_lrs: list[str]
    finetune: list[str]         # benign / harmful-mixture fine-tunes of (c)
    aoa: list[str]
    aoa_epochs: list[int]
    mix_shares: list[float]
    attribute: list[str]
    eval: list[str]             # sizes of eval=study (study_aoa for the AOA models)
    seeds: list[int]
    random_seeds: list[int]
    workers: int = 1            # processes running the stages after the setup (study_runner.run_parallel)
    a_objectives: list[str] = field(default_factory=lambda: ["sft"])  # claim (a)'s objective axis (OBJECTIVE_DATA)
    a_objective_lrs: list[str] = field(default_factory=list)          # their lrs (empty: a_lrs); SFT runs at a_lrs
    base_model: list[str] = field(default_factory=lambda: ["model=smollm2_135m"])
    teacher: list[str] = field(default_factory=list)  # harmful-mixture overrides (default teacher: the shipped model)


def one_epoch(num_samples: int, max_length: int, batch_size: int, lr: str | None = None,
              data: str | None = None) -> list[str]:
    """The data and trainer overrides of one epoch over `num_samples` examples (optionally data=<data>, then lr)."""
    return [*([f"data={data}"] if data else []), f"data.num_samples={num_samples}", f"data.max_length={max_length}",
            f"data.batch_size={batch_size}", "trainer.max_epochs=1", *([f"optim.lr={lr}"] if lr else [])]


def common_overrides(trainer: str) -> list[str]:
    """Every train stage of a scale: no logger, checkpoint, export, validation split or progress bar (a study has
    hundreds of short stages, each evaluated in memory)."""
    return [f"trainer={trainer}", "logger=none", "callbacks=none", "export=false", "data.val_fraction=0.0",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "trainer.enable_checkpointing=false", "optim.warmup_ratio=0.05"]


SCALES = {
    # One H100 ran this scale's setup, (b) and most of (a) with batch 16 and three generation passes per stage
    # (results/ssah_smollm2.md): a 135M model leaves the GPU latency-bound, so a stage's seconds follow its number
    # of optimizer steps and decoding passes, not its batch size. Hence batch 32 for the short trainings, every
    # refusal prompt of a stage in one decoding pass, and 3 worker processes sharing the GPU after the setup
    # (benchmarks/project_study_time.py projects the time from the measured stages).
    "gpu": Scale(
        name="gpu", hardware="one GPU, bf16-mixed",
        common=common_overrides("gpu"),
        align=[*one_epoch(4000, 256, 16, lr="5e-5", data="mix"), "export=true"],
        budget_align=one_epoch(1000, 256, 32, data="mix"),
        a_lrs=["5e-5", "2e-4"],
        finetune=one_epoch(400, 256, 32, lr="1e-4"),
        aoa=["optim.lr=1e-4", "data.batch_size=5"],  # batch < AOA's 10 conversations: see AOA_SEEDS below
        aoa_epochs=[1, 3, 5, 10],
        mix_shares=[0.05, 0.1, 0.2],
        attribute=["scoring=wifv", "calibration.nsamples=128", "calibration.max_length=256"],  # as it was run
        eval=["eval.batch_size=512", "+eval.pool_generation=true"],
        seeds=[0, 1, 2], random_seeds=[0, 1, 2], workers=3),
    # 2 CPU cores: every stage at small sizes (two one-thread workers; stage times: <stage>.stage.json); the
    # aligned model is the quickstart-scale full alignment, far below the GPU scale's 2,000 + 2,000 examples.
    "cpu": Scale(
        name="cpu", hardware="CPU (2 cores), float32, reduced sizes",
        common=common_overrides("cpu"),
        align=[*one_epoch(480, 128, 8, lr="2e-4", data="mix"), "export=true"],
        budget_align=one_epoch(96, 128, 8, data="mix"),
        a_lrs=["5e-5", "2e-4"],
        finetune=one_epoch(24, 128, 4, lr="3e-4"),
        aoa=["optim.lr=5e-5", "data.batch_size=5", "data.max_length=160"],
        aoa_epochs=[1, 2, 4],
        mix_shares=[0.05, 0.1, 0.2],
        attribute=["scoring=wifv", "calibration.nsamples=64", "calibration.max_length=128"],  # as it was run
        eval=["eval.max_new_tokens=32", "eval.tasks.harmful.limit=48", "eval.tasks.oktest.limit=32",
              "eval.tasks.ppl.limit=24", "eval.tasks.ppl_dolly.limit=24"],
        seeds=[0, 1, 2], random_seeds=[0, 1, 2], workers=2,
        # DPO and unlearning at the alignment's lr only (fixed before any run): 18 more stages, ~30 min
        a_objectives=["sft", "dpo", "unlearning"], a_objective_lrs=["2e-4"]),
}


# AOA_SEEDS: AOA has 10 conversations. In one batch of 10, every seed trained the same model (the seeded shuffle
# only reorders one batch; SmolLM2 has no dropout), so "3 seeds" were 3 copies of one run. Batches of 5 make the
# seed choose which conversations step together and in which order.


def threats(scale: Scale) -> list[Threat]:
    """The threat models of (c), in run order: benign first, then the harmful mixture by p, then AOA by epochs."""
    out = [Threat("alpaca", "benign: Alpaca", "benign", "ppl", ("data=alpaca", *scale.finetune)),
           Threat("dolly", "benign: Dolly", "benign", "ppl_dolly", ("data=dolly", *scale.finetune))]
    for p in scale.mix_shares:
        out.append(Threat(f"mix{round(100 * p):02d}", f"harmful mixture p={p:g}", "harmful_mix", "ppl",
                          ("data=harmful_mix", f"data.harmful_share={p}", *scale.finetune, *scale.teacher),
                          strength=p))
    for e in scale.aoa_epochs:  # AOA has no held-out split: its utility is Alpaca's held-out perplexity
        out.append(Threat(f"aoa{e}", f"AOA, {e} epoch{'s' * (e != 1)}", "aoa", "ppl",
                          ("data=aoa", *scale.aoa, f"trainer.max_epochs={e}"), strength=e))
    return out


def model_overrides(key: str, scale, study_dir: str) -> list[str]:
    """The model config of SHIPPED (the scale's base model), ALIGNED (stage `align`'s export) or any other stage
    name (that stage's export, e.g. the defense benchmark's alignments) as overrides."""
    if key == SHIPPED:
        return list(scale.base_model)
    return ["model=hf", f"model.path={study_dir}/{'align' if key == ALIGNED else key}/model"]


@dataclass
class Stage:
    name: str
    kind: str                   # attribute | align | train_eval | eval | posthoc
    model: str                  # SHIPPED, ALIGNED or a stage name: the model the stage starts from
    train: list[str] = field(default_factory=list)      # train.py overrides (align, train_eval)
    evaluate: list[str] = field(default_factory=list)   # evaluate.py overrides (align, train_eval, eval)
    attribute: list[str] = field(default_factory=list)  # attribute.py overrides (attribute)
    labels: dict = field(default_factory=dict)          # what the report groups by (claim, threat, freeze, ...)
    needs: list[str] = field(default_factory=list)      # files (relative to the study) another worker may still write
    reference: str = ""         # posthoc: the model whose weights the defense's update is measured from (W_aligned)

    @property
    def done_file(self) -> str:
        """Relative to the stage dir: the file whose existence marks the stage finished."""
        return "unit_map.safetensors" if self.kind == "attribute" else "eval.json"


def plan(scale: Scale, study_dir: str) -> list[Stage]:
    """Every stage of the v2 study at `scale`, in run order; paths point into `study_dir`."""
    base_map = f"{study_dir}/attribute_base/unit_map.safetensors"
    aligned_map = f"{study_dir}/attribute_aligned/unit_map.safetensors"
    ev, ev_aoa = ["eval=study", *scale.eval], ["eval=study_aoa", *scale.eval]
    stages = [
        Stage("attribute_base", "attribute", SHIPPED, attribute=[*scale.base_model, *scale.attribute],
              labels={"claim": "setup"}),
        Stage("align", "align", SHIPPED, train=[*scale.base_model, *scale.common, *scale.align, "seed=0"],
              evaluate=ev, labels={"claim": "setup", "role": "aligned model"}),
        Stage("shipped", "eval", SHIPPED, evaluate=ev, labels={"claim": "setup", "role": "shipped model"}),
        Stage("attribute_aligned", "attribute", ALIGNED,
              attribute=[*model_overrides(ALIGNED, scale, study_dir), *scale.attribute],
              labels={"claim": "setup"}),
        Stage("aligned_aoaprompt", "eval", ALIGNED, evaluate=ev_aoa,
              labels={"claim": "setup", "role": "aligned model, AOA prompt"}),
    ]
    for cls in ABLATED:
        stages.append(Stage(f"b_{cls}", "eval", ALIGNED,
                            evaluate=[*ev, f"ablate.unit_map={aligned_map}", f"ablate.classes={cls}"],
                            labels={"claim": "b", "ablated": cls}))
        for s in scale.random_seeds:
            stages.append(Stage(f"b_random_{cls}_s{s}", "eval", ALIGNED,
                                evaluate=[*ev, f"ablate.unit_map={aligned_map}", f"ablate.random_like={cls}",
                                          f"ablate.seed={s}"],
                                labels={"claim": "b", "ablated": f"random_{cls}", "like": cls, "seed": s}))
    for objective, lrs in a_objectives(scale).items():
        data = [x if not x.startswith("data=") else f"data={OBJECTIVE_DATA[objective]}" for x in scale.budget_align]
        obj = [] if objective == "sft" else [f"objective={objective}"]
        for lr in lrs:
            for seed in scale.seeds:
                for method in ALIGN_METHODS:
                    fr = ALIGN_OVERRIDES[method] + ([] if method == "full" else
                                                    [f"freeze.unit_map={base_map}", f"freeze.seed={seed}"])
                    stages.append(Stage(a_name(method, lr, seed, objective), "train_eval", SHIPPED,
                                        train=[*scale.base_model, *scale.common, *data, *obj, *fr,
                                               f"optim.lr={lr}", f"seed={seed}"],
                                        evaluate=ev, labels={"claim": "a", "method": method, "lr": lr, "seed": seed,
                                                             "objective": objective}))
    for threat in threats(scale):
        ev_t = ev_aoa if threat.family == "aoa" else ev  # the AOA models are attacked as they were trained
        for seed in scale.seeds:
            for fr in FREEZES:
                unit = [] if fr == "none" else [f"freeze.unit_map={aligned_map}", f"freeze.seed={seed}"]
                stages.append(Stage(
                    f"c_{threat.key}_{fr}_s{seed}", "train_eval", ALIGNED,
                    train=[*model_overrides(ALIGNED, scale, study_dir), *scale.common, *threat.overrides,
                           *FREEZE_OVERRIDES[fr], *unit, f"seed={seed}"],
                    evaluate=ev_t,
                    labels={"claim": "c", "threat": threat.key, "threat_label": threat.label,
                            "family": threat.family, "strength": threat.strength,
                            "utility_task": threat.utility_task, "freeze": fr, "seed": seed}))
    return stages


def dependencies(stages: list[Stage]) -> dict[str, list[str]]:
    """Each stage's inputs among `stages`: earlier setup stages for a setup stage, the whole setup for the others,
    and the stages that write the files it needs (the first component of a needed path is its stage)."""
    names = [s.name for s in stages]
    setup = [s.name for s in stages if s.labels.get("claim") == "setup"]
    out = {}
    for s in stages:
        deps = setup[:setup.index(s.name)] if s.name in setup else list(setup)
        deps += [f.split("/")[0] for f in s.needs if f.split("/")[0] in names]
        out[s.name] = [n for n in names if n in set(deps) - {s.name}]  # plan order
    return out
