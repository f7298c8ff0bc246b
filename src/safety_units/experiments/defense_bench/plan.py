"""The defense benchmark v2's stages: tuned defenses against a tuned attacker, with seed-level statistics, on the
harmful fine-tuning protocol of Vaccine / Lisa / Booster / Antidote (an aligned model fine-tuned on SST-2 with a
share p = 0.1 of harmful BeaverTails pairs). Run by the study runner (safety_units.experiments.study.runner:
in memory, resumable by config hash, worker processes, a time budget).

The plan grows in three phases; each later phase needs the choices written by the one before (tuning.py writes
them to <bench>/selection.json by the rules in criteria.py, from validation data only):
    1. tune    every defense at every point of its grid (conf/defense/<d>.yaml `tune:`), alignment seed 0, the
               protocol attack
    2. attack  each defense at its chosen setting under every other attack of the scale's grid, seed 0
    3. test    each chosen setting at alignment seeds 1, 2 ... under the protocol attack and the defense's worst
               attack (the attack with the highest validation HS that still learns the task)
A defense whose grid has no eligible setting (tuning.carried) stops after phase 1: it is reported as failing.
Every cell is evaluated on both splits (eval=defense): validation prompts choose, test prompts are reported.

Stages:
    align_sft_s<k>                         SFT alignment of the shipped model, alignment seed k (setup: k = 0)
    attribute_s<k>                         its unit map (wifv), for the unit defenses of seed k
    align_<d>_<setting>_s<k>               an alignment-stage defense (vaccine, booster) at a grid point;
                                           sn_tune re-aligns align_sft_s<k>'s ESU
    ft_<attack>_<d>[_<setting>]_s<k>       a fine-tune from the defense's aligned model of seed k, evaluated;
                                           ft_<attack>_none_s<k> is exported: the post-hoc defenses start from it
    post_<attack>_<d>[_<setting>]_s<k>     a post-hoc defense (SafeLoRA, Antidote, random pruning, the matched-
                                           drift shrink) applied to ft_<attack>_none_s<k>, evaluated
Fine-tune seed k starts from alignment seed k, so a seed-level interval carries the alignment's variance too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from safety_units.experiments.defense_bench import peers, tuning
from safety_units.experiments.study.plan import SHIPPED, Stage, common_overrides, dependencies, one_epoch

BENCH_NAME = "defenses_smollm2"
SFT = "none"

ALIGN_DEFENSES = ("vaccine", "booster", "sn_tune")
FINETUNE_DEFENSES = ("esu_cu", "random", "lisa", "safeinstr")
POSTHOC_DEFENSES = ("safelora", "antidote", "random_prune")
DEFENSES = (SFT, *FINETUNE_DEFENSES, *POSTHOC_DEFENSES, *ALIGN_DEFENSES)
UNIT_DEFENSES = ("esu_cu", "random", "sn_tune")
PEERS = ("vaccine", "booster", "lisa", "safeinstr", "safelora", "antidote")
# controls: not tuned, they take the chosen setting of the defense they control
CONTROLS = {"random": "esu_cu", "random_prune": "antidote"}
# the matched-drift SFT control (defense=shrink): SFT's update scaled to each of these defenses' ||dW||
SHRINK_OF = ("lisa", "safelora", "antidote")
PROTOCOL = "proto"


@dataclass(frozen=True)
class Attack:
    key: str
    label: str
    overrides: tuple[str, ...]   # the fine-tune's data, optimiser and adapter overrides


@dataclass
class BenchScale:
    name: str
    hardware: str
    common: list[str]
    align: list[str]                # alignment runs (SFT and the alignment-stage defenses), from the shipped model
    sn_tune: list[str]              # SN-Tune's re-alignment of align_sft
    task_n: int                     # n of data=task_mix
    attacks: dict[str, tuple[str, list[str]]]   # key -> (label, fine-tune overrides); PROTOCOL first
    attribute: list[str]
    eval: list[str]
    seeds: list[int]                # alignment = fine-tune seeds; seeds[0] tunes
    grid: str = "ofat"              # ofat: one factor at a time around the config's values | paired: the axes
                                    # moved together | full: the product | published: none (peers.py)
    workers: int = 2
    base_model: list[str] = field(default_factory=lambda: ["model=smollm2_135m"])
    benign_reference: bool = True   # ft_benign_none_s0: SFT on p = 0 (the task alone), what the task costs in HS
    peers_as_published: bool = False  # each peer aligns and fine-tunes through LoRA as its scripts do (peers.py)
    lisa_cycles: int = 4            # Lisa's alternations (its script: 20 periods of 100 + 900 steps; at 32 steps,
                                    # 4 periods of 8 keep a 1-step alignment phase at its share 0.1)


def task_mix(n: int, p: float) -> list[str]:
    """The user's data (data=task_mix: SST-2 rows of hash [0, 0.98) -- [0.98, 1) is eval=defense's validation FA --
    and a share p of attack-pool pairs)."""
    return ["data=task_mix", f"data.harmful_share={p}", f"data.num_samples={n}"]


def attack(lr: str, epochs: int, length: int, batch: int, lora: bool = False, note: str = "") -> tuple[str, list[str]]:
    """One entry of a scale's attack grid: (its label, its fine-tune overrides); LoRA attacks use conf/adapter/lora
    (r 16, alpha 32, every linear layer)."""
    label = (f"{'LoRA r 16 alpha 32 (all linear)' if lora else 'full fine-tune'}, lr {lr}, {epochs} "
             f"epoch{'s' if epochs > 1 else ''}{f' ({note})' if note else ''}")
    return label, [*(["adapter=lora"] if lora else []), f"data.max_length={length}", f"data.batch_size={batch}",
                   f"optim.lr={lr}", f"trainer.max_epochs={epochs}"]


SCALES = {
    # 2 CPU cores, float32, two one-thread workers. Sized for about 5 hours (the budget; results/defenses.md
    # projects the whole plan from the measured stages): a 240-example alignment (30 steps) per alignment seed and
    # grid point; fine-tunes of 128 examples x 2 epochs at lr 4e-4 (32 steps: from the SFT-aligned model this put
    # validation FA at 0.845 against a majority of 0.56, measured before the runs; v1's 96 x 2 at 2e-4 left FA
    # near its floor); grids of 2 points (3 for the post-hoc defenses, which cost no training), the axes moved
    # together from each peer's published value (measured: a Vaccine alignment ~19 min, a 32-step fine-tune
    # with both evaluations ~8 min in a one-thread worker, so every grid point costs); an attack grid of the
    # protocol, twice its learning rate and a LoRA attack. Cut against v1: the harmful-examples threat (bad10), the
    # ESU-only / layer / mask-scored / SCANS-layer freezes (none beat SFT in v1), the esu_cu scorer axis (wifv only).
    "cpu": BenchScale(
        name="cpu", hardware="CPU (2 cores), float32, reduced sizes",
        common=common_overrides("cpu"),
        align=[*one_epoch(240, 128, 8, lr="2e-4", data="mix"), "export=true"],
        sn_tune=[*one_epoch(64, 128, 8, lr="2e-4", data="refusal_stl"), "export=true"],
        task_n=128,
        attacks={PROTOCOL: attack("4e-4", 2, 96, 8, note="the protocol"), "lr2x": attack("8e-4", 2, 96, 8),
                 "lora": attack("4e-3", 2, 96, 8, lora=True)},
        attribute=["scoring=wifv", "calibration.nsamples=64", "calibration.max_length=128"],
        eval=["eval=defense", "eval.tasks.beavertails.limit=64", "eval.tasks.beavertails_val.limit=48",
              "eval.tasks.sst2_val.limit=200", "eval.tasks.oktest.limit=32", "eval.tasks.ppl.limit=24",
              "eval.max_new_tokens=48"],
        seeds=[0, 1, 2], grid="paired", workers=2),
    # One GPU (no GPU was lent to this issue: never run): the protocol's n = 1000 at p = 0.1 with the peers'
    # published fine-tune, full grids, an attack grid of learning rate x epochs, full and LoRA, 3 alignment seeds.
    "gpu": BenchScale(
        name="gpu", hardware="one GPU, bf16-mixed",
        common=common_overrides("gpu"),
        align=[*one_epoch(2000, 256, 16, lr="5e-5", data="mix"), "export=true"],
        sn_tune=[*one_epoch(256, 256, 16, lr="5e-5", data="refusal_stl"), "export=true"],
        task_n=1000,
        attacks={PROTOCOL: attack("1e-4", 1, 256, 32), "lr3x": attack("3e-4", 1, 256, 32),
                 "ep3": attack("1e-4", 3, 256, 32), "lora": attack("1e-3", 1, 256, 32, lora=True),
                 "lora_ep3": attack("1e-3", 3, 256, 32, lora=True)},
        attribute=["scoring=wifv", "calibration.nsamples=128", "calibration.max_length=256"],
        eval=["eval=defense", "eval.tasks.beavertails.limit=500", "eval.tasks.beavertails_val.limit=200",
              "eval.tasks.oktest.limit=100", "eval.tasks.ppl.limit=100", "eval.batch_size=256",
              "+eval.pool_generation=true"],
        seeds=[0, 1, 2], grid="full", workers=3, lisa_cycles=20),
}
SCALES["gpu_full"] = replace(SCALES["gpu"], name="gpu_full", seeds=[0, 1, 2, 3, 4])
# The peers as published: every peer at its scripts' LoRA rank, alpha, targets, learning rates and epochs and its own
# hyper-parameters (peers.PEERS_AS_PUBLISHED; SFT and the unit defenses as the SFT script of git-disl/Vaccine), no
# grid, the protocol attack only; post-hoc peers run inside their own LoRA fine-tune.
SCALES["gpu_peers"] = replace(SCALES["gpu"], name="gpu_peers", grid="published", peers_as_published=True,
                              attacks={PROTOCOL: ("each peer's published fine-tune (peers.py)", SCALES["gpu"].attacks[
                                  PROTOCOL][1])})


def attacks(scale: BenchScale) -> list[Attack]:
    return [Attack(k, label, tuple(over)) for k, (label, over) in scale.attacks.items()]


def settings(defense: str, scale: BenchScale) -> dict[str, list[str]]:
    """{setting tag: its overrides} of a defense's tuning grid at this scale ({"": []} without a grid)."""
    return tuning.grid_points(defense, scale.grid)


def ft_name(attack: str, defense: str, tag: str, seed: int) -> str:
    kind = "post" if defense in POSTHOC_DEFENSES or defense.startswith("shrink") else "ft"
    return f"{kind}_{attack}_{defense}{'_' + tag if tag else ''}_s{seed}"


def align_name(defense: str, tag: str, seed: int) -> str:
    return f"align_sft_s{seed}" if defense == SFT else f"align_{defense}{'_' + tag if tag else ''}_s{seed}"


def model_of(key: str, study_dir: str, scale: BenchScale) -> list[str]:
    return list(scale.base_model) if key == SHIPPED else ["model=hf", f"model.path={study_dir}/{key}/model"]


class Planner:
    """Builds the stages of one benchmark dir; `cells` collects them in run order, without duplicates (the test
    phase reuses seed 0's tuning and attack cells)."""

    def __init__(self, scale: BenchScale, study_dir: str):
        self.scale, self.dir = scale, study_dir
        self.ev = list(scale.eval)
        self.base = [*scale.base_model, *scale.common]
        self.attacks = {a.key: a for a in attacks(scale)}
        self.stages: dict[str, Stage] = {}

    def add(self, stage: Stage) -> str:
        self.stages.setdefault(stage.name, stage)
        return stage.name

    def setup(self, seed: int) -> None:
        """align_sft_s<k> and attribute_s<k> (seed 0 in the setup: every stage needs them)."""
        claim = "setup" if seed == self.scale.seeds[0] else "align"
        self.add(Stage(align_name(SFT, "", seed), "align", SHIPPED,
                       train=[*self.base, *self.scale.align, *self.published(SFT, "align"), "defense=none",
                              f"seed={seed}"], evaluate=self.ev,
                       labels={"claim": claim, "role": "aligned", "defense": SFT, "setting": "", "seed": seed}))
        self.add(Stage(f"attribute_s{seed}", "attribute", align_name(SFT, "", seed),
                       attribute=[*model_of(align_name(SFT, "", seed), self.dir, self.scale), *self.scale.attribute],
                       labels={"claim": claim}, needs=[f"{align_name(SFT, '', seed)}/model/config.json"]))

    def published(self, defense: str, run: str) -> list[str]:
        """peers_as_published: the overrides of a defense's alignment (`align`) or fine-tune (`finetune`) as its
        scripts run them (a defense with no published entry runs like SFT's); [] otherwise."""
        if not self.scale.peers_as_published:
            return []
        key = defense if defense in peers.PEERS_AS_PUBLISHED else SFT
        if run == "align":
            return peers.align_overrides(key) if defense in (SFT, *ALIGN_DEFENSES) and key == defense else []
        return peers.finetune_overrides(key)

    def aligned(self, defense: str, tag: str, over: list[str], seed: int) -> str:
        """The aligned model a fine-tune of `defense` starts from (its own alignment for alignment defenses)."""
        sft = align_name(SFT, "", seed)
        if defense not in ALIGN_DEFENSES:
            return sft
        name = align_name(defense, tag, seed)
        labels = {"claim": "align", "role": "aligned", "defense": defense, "setting": tag, "seed": seed}
        if defense == "sn_tune":
            self.add(Stage(name, "align", sft, train=[*model_of(sft, self.dir, self.scale), *self.scale.common,
                                                      *self.scale.sn_tune, "defense=sn_tune", *over,
                                                      f"freeze.unit_map={self.dir}/attribute_s{seed}/unit_map.safetensors",
                                                      f"seed={seed}"],
                           evaluate=self.ev, labels=labels,
                           needs=[f"{sft}/model/config.json", f"attribute_s{seed}/unit_map.safetensors"]))
        else:
            self.add(Stage(name, "align", SHIPPED, train=[*self.base, *self.scale.align, f"defense={defense}",
                                                         *self.published(defense, "align"), *over, f"seed={seed}"],
                           evaluate=self.ev, labels=labels))
        return name

    def cell(self, attack: str, defense: str, tag: str, over: list[str], seed: int, phase: str) -> str:
        """One fine-tune (or post-hoc) cell, with the stages it needs."""
        a = self.attacks[attack]
        labels = {"claim": "finetune", "phase": phase, "attack": attack, "defense": defense, "setting": tag,
                  "seed": seed}
        sft_ft = ft_name(attack, SFT, "", seed)
        if (defense in POSTHOC_DEFENSES or defense.startswith("shrink")) and not self.scale.peers_as_published:
            self.cell(attack, SFT, "", [], seed, phase)
            sft = align_name(SFT, "", seed)
            needs = [f"{sft_ft}/model/config.json"]
            if defense.startswith("shrink_"):   # the matched drift: the defense's ||dW|| from its cell's point.json
                target = over[0]
                needs.append(f"{target}/point.json")
                over = ["defense=shrink", f"defense.norm_of={self.dir}/{target}/point.json"]
            else:
                over = [f"defense={defense}", *over]
            return self.add(Stage(ft_name(attack, defense, tag, seed), "posthoc", sft_ft,
                                  train=[*model_of(sft, self.dir, self.scale), *self.scale.common, *a.overrides,
                                         *task_mix(self.scale.task_n, 0.1), *over, f"seed={seed}"],
                                  evaluate=self.ev, labels=labels, needs=needs, reference=sft))
        start = self.aligned(defense, tag, over, seed)
        if defense in ALIGN_DEFENSES:
            train_over = ["defense=none"]
        elif defense in ("esu_cu", "random"):
            train_over = [f"defense={defense}", *over, f"freeze.seed={seed}",
                          f"freeze.unit_map={self.dir}/attribute_s{seed}/unit_map.safetensors",
                          *(["freeze.like=esu_cu"] if defense == "random" else [])]
        else:
            train_over = [f"defense={defense}", *over]
        if defense == "lisa":  # alternations over this run's steps (Lisa's script: 20 of 100 + 900 steps)
            train_over.insert(1, f"defense.cycles={self.scale.lisa_cycles}")
        needs = [f"{start}/model/config.json"]
        if defense in ("esu_cu", "random"):
            needs.append(f"attribute_s{seed}/unit_map.safetensors")
        export = ["export=true"] if defense == SFT and not self.scale.peers_as_published else []
        return self.add(Stage(ft_name(attack, defense, tag, seed), "train_eval", start,
                              train=[*model_of(start, self.dir, self.scale), *self.scale.common, *a.overrides,
                                     *task_mix(self.scale.task_n, 0.1), *train_over,
                                     *self.published(defense, "finetune"), *export, f"seed={seed}"],
                              evaluate=self.ev, labels=labels, needs=needs))


def plan(scale: BenchScale, study_dir: str, selection: dict | None = None) -> list[Stage]:
    """Every stage of the benchmark at `scale` that can be planned now, in run order: the tuning phase, and the
    attack and test phases once <study_dir>/selection.json (tuning.write_selection) holds their choices."""
    if selection is None:
        selection = tuning.read_selection(study_dir)
    p = Planner(scale, study_dir)
    s0 = scale.seeds[0]
    p.setup(s0)
    if scale.benign_reference:  # the task alone (p = 0): what fine-tuning costs in HS without harmful data
        a = p.attacks[PROTOCOL]
        p.add(Stage(f"ft_benign_none_s{s0}", "train_eval", align_name(SFT, "", s0),
                    train=[*model_of(align_name(SFT, "", s0), study_dir, scale), *scale.common, *a.overrides,
                           *task_mix(scale.task_n, 0.0), "defense=none", f"seed={s0}"],
                    evaluate=p.ev, needs=[f"{align_name(SFT, '', s0)}/model/config.json"],
                    labels={"claim": "finetune", "phase": "reference", "attack": "benign", "defense": SFT,
                            "setting": "", "seed": s0}))
    # phase 1: the grids (controls wait for the setting of the defense they control)
    for d in DEFENSES:
        if d in CONTROLS:
            continue
        for tag, over in settings(d, scale).items():
            p.cell(PROTOCOL, d, tag, over, s0, "tune")
    chosen = selection.get("settings") or {}
    if not chosen:
        return ordered(p)
    every = dict(chosen) | {c: chosen[of] for c, of in CONTROLS.items()}  # a control at its defense's setting
    for d, tag in every.items():  # (seed 0, the protocol: each control beside its defense, eligible or not)
        if d not in DEFENSES:
            continue
        over = settings(CONTROLS.get(d, d), scale).get(tag, [])
        p.cell(PROTOCOL, d, tag, over, s0, "tune")
    picks = tuning.carried(selection, CONTROLS)  # a defense with no eligible setting stops here
    shrink = {} if scale.peers_as_published else {d: ft_name(PROTOCOL, d, picks[d], s0) for d in SHRINK_OF
                                                  if d in picks}  # (the shrink runs on SFT's exported fine-tune)
    for d, target in shrink.items():
        p.cell(PROTOCOL, f"shrink_{d}", "", [target], s0, "tune")
    # phase 2: every other attack at the chosen settings
    for attack in list(p.attacks)[1:]:
        for d, tag in picks.items():
            p.cell(attack, d, tag, settings(CONTROLS.get(d, d), scale).get(tag, []), s0, "attack")
        for d in shrink:
            p.cell(attack, f"shrink_{d}", "", [ft_name(attack, d, picks[d], s0)], s0, "attack")
    worst = selection.get("worst_attack") or {}
    if not worst:
        return ordered(p)
    # phase 3: the other alignment seeds, at the protocol and at each defense's worst attack (SFT's own cells at
    # those attacks come with them: every comparison pairs cells of the same seed and attack)
    for seed in scale.seeds[1:]:
        p.setup(seed)
        for d, tag in picks.items():
            over = settings(CONTROLS.get(d, d), scale).get(tag, [])
            for attack in dict.fromkeys([PROTOCOL, worst.get(d, PROTOCOL)]):
                p.cell(attack, d, tag, over, seed, "test")
        for d in shrink:
            for attack in dict.fromkeys([PROTOCOL, worst.get(d, PROTOCOL)]):
                p.cell(attack, f"shrink_{d}", "", [ft_name(attack, d, picks[d], seed)], seed, "test")
    return ordered(p)


def full_plan(scale: BenchScale, study_dir: str, worst: str | None = None) -> list[Stage]:
    """Every phase's stages before any choice is made, for projections: each defense at its config's own setting
    and every defense's worst attack `worst` (default: the scale's last attack, the most stages)."""
    picks = {d: tuning.default_tag(d) if scale.grid != "published" else "" for d in DEFENSES if d not in CONTROLS}
    attack = worst or list(scale.attacks)[-1]
    return plan(scale, study_dir, {"settings": picks, "worst_attack": {d: attack for d in DEFENSES}})


def ordered(p: Planner) -> list[Stage]:
    """The setup first (it runs alone, before the workers start); then the rest by depth -- each stage after every
    stage it starts from or needs, so a worker never takes a stage whose producer is still queued behind it and
    idles waiting -- the alignments and attributions (the long stages) first within a depth; plan order within
    each."""
    setup = {n for n, s in p.stages.items() if s.labels.get("claim") == "setup"}
    inputs = dependencies(list(p.stages.values()))  # (every stage's model is among the files it needs)
    depth: dict[str, int] = {}

    def depth_of(name: str) -> int:
        if name not in depth:
            depth[name] = 1 + max((depth_of(u) for u in set(inputs[name]) - setup), default=-1)
        return depth[name]

    index = {n: i for i, n in enumerate(p.stages)}
    return sorted(p.stages.values(), key=lambda s: (s.name not in setup, depth_of(s.name),
                                                    s.kind not in ("align", "attribute"), index[s.name]))


def advance(bench, scale: BenchScale, harm_judge) -> bool:
    """Read the cells so far, apply the rules (tuning.choose) and write selection.json; True when the plan grew
    (scripts/run_defenses.py then runs another pass)."""
    cells = tuning.read_cells(bench, harm_judge)
    selection = tuning.choose(cells, DEFENSES, CONTROLS, list(scale.attacks), scale.seeds[0], scale.grid)
    before = {s.name for s in plan(scale, str(bench))}
    tuning.write_selection(bench, selection)
    return bool({s.name for s in plan(scale, str(bench), selection)} - before)
