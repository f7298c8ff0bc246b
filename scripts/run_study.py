"""The Superficial Safety Alignment Hypothesis study on SmolLM2-135M-Instruct, end to end.

    python scripts/run_study.py                 # CPU scale (hours on 2 cores)
    python scripts/run_study.py --resume        # keep finished stages whose config is unchanged, run the rest
    python scripts/run_study.py --scale gpu     # the sizes of conf/experiment/ssah/* (bf16 on one GPU)
    python scripts/run_study.py --report-only   # rebuild results/ from finished runs

Each finished stage leaves <study>/<stage>.stage.json with the hash of its composed config (the entry point's
config with the stage's overrides, before interpolation); --resume skips a stage only when its output exists and
that hash still matches, and reruns it otherwise. Without --resume or --force, existing outputs stop the run.

Stages (each one command, chained by output paths under logs/ssah_smollm2/):
    1. attribute the shipped model                      -> RU budget for claim (a)
    2. align it: full fine-tuning vs RU-only            -> claim (a)
    3. attribute the aligned model                      -> ESU / EUU / RU
    4. ablate ESU / EUU / RU, each with random sets of its own size (seeds) -> claim (b)
    5. fine-tune the aligned model on Alpaca and on the AOA identity shift, freeze=none/esu/esu_cu/random -> (c)
    6. evaluate every model (harmful ASR, over-refusal, MMLU, perplexity) and write results/ssah_smollm2.md
       (safety_units.study_report: every number and setting is read from the runs' artifacts)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from safety_units.errors import friendly_errors
from safety_units.study_report import write_report
from safety_units.study_verdicts import ABLATED, FREEZES

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "logs" / "ssah_smollm2"
RESULTS = ROOT / "results"

# Reductions for 2 CPU cores (the configs hold the GPU-scale sizes).
CPU = {
    "common": ["trainer=cpu", "logger=csv"],
    "align": ["data.num_samples=480", "data.max_length=192", "trainer.max_epochs=1", "optim.lr=5e-5",
              "callbacks.model_checkpoint.every_n_train_steps=1000"],
    "benign": ["data.num_samples=400", "data.max_length=192", "trainer.max_epochs=1", "optim.lr=5e-5",
               "callbacks.model_checkpoint.every_n_train_steps=1000"],
    # Qi et al.'s recipe (the config's 5 epochs at lr 5e-5: 5 optimizer steps on 10 conversations) is a weak attack
    # on this reduced-scale model; a longer, larger-step attack makes the freezing test meaningful. The report
    # states the settings each run used.
    "aoa": ["optim.lr=2e-4", "trainer.max_epochs=10"],
    "attribute": ["calibration.nsamples=128"],
    "eval": ["eval.max_new_tokens=48", "eval.tasks.oktest.limit=100", "eval.tasks.harmless.limit=100",
             "eval.tasks.ppl.limit=100"],
}
GPU = {"common": ["trainer=gpu", "logger=csv"], "align": [], "benign": [], "aoa": [], "attribute": [],
       "eval": ["eval.max_new_tokens=128"]}
# Alignment runs at two learning rates for both methods (the first is the scale's own and makes the aligned model
# that stages 3-5 use); sparse updates often want a larger one, so each method is shown at both.
ALIGN_LRS = {"": None, "_lr2e-4": "2e-4"}


def pretty(cmd: list[str]) -> str:
    return "python " + " ".join(shlex.quote(c) for c in cmd[1:])


def stage_hash(cmd: list[str]) -> str:
    """Hash of the stage's composed config: the entry point's config with the stage's overrides, unresolved."""
    from omegaconf import OmegaConf

    from safety_units.config import compose_config

    entry = Path(cmd[1]).stem  # train.py / attribute.py / evaluate.py
    overrides = [c for c in cmd[2:] if "=" in c and not c.startswith("hydra.")]
    cfg = compose_config(entry, overrides)
    text = OmegaConf.to_yaml(cfg, resolve=False) + json.dumps([c for c in cmd[2:] if c.startswith("hydra.")])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run(cmd: list[str], log_name: str, done: Path, force: bool, resume: bool = True) -> str:
    """Run one stage unless it is finished with the same config; returns "ran" or "skipped"."""
    stamp = STUDY / f"{log_name}.stage.json"
    digest = stage_hash(cmd)
    if done.exists() and not force:
        recorded = json.loads(stamp.read_text()).get("config_hash") if stamp.is_file() else None
        if not resume:
            sys.exit(f"stage {log_name} has outputs ({done}); pass --resume to keep finished stages whose config "
                     f"is unchanged, or --force to rerun every stage.")
        if recorded == digest:
            print(f"[skip] {log_name}: {done.relative_to(ROOT)} exists, config unchanged", flush=True)
            return "skipped"
        print(f"[redo] {log_name}: config changed since it ran (hash {recorded} -> {digest})", flush=True)
    print(f"[run ] {log_name}: {pretty(cmd)}", flush=True)
    STUDY.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(STUDY / f"{log_name}.log", "w") as f:
        res = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if res.returncode != 0:
        sys.exit(f"stage {log_name} failed (exit {res.returncode}); see {STUDY / (log_name + '.log')}")
    if not done.exists():
        sys.exit(f"stage {log_name} ended without writing {done}; see {STUDY / (log_name + '.log')}")
    stamp.write_text(json.dumps({"config_hash": digest, "command": pretty(cmd), "minutes": (time.time() - t0) / 60}))
    print(f"       done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return "ran"


def stages(scale: dict, seeds: list[int], random_seeds: list[int]) -> list[tuple[list[str], str, Path]]:
    """The study's stages in order: (command, log name, the file whose existence marks the stage done)."""
    plan: list[tuple[list[str], str, Path]] = []

    def add(cmd: list[str], name: str, done: Path) -> None:
        plan.append((cmd, name, done))

    py = sys.executable
    c = scale["common"]
    add([py, "attribute.py", "experiment=ssah/attribute_base", *scale["attribute"]], "attribute_base",
        STUDY / "attribute_base" / "unit_map.safetensors")
    for lr_tag, lr in ALIGN_LRS.items():
        for exp, tag in (("ssah/align_full", "align_none"), ("ssah/align_ru", "align_ru_only")):
            args = scale["align"]
            if lr_tag:
                args = [a for a in args if not a.startswith("optim.lr=")] + [f"optim.lr={lr}", f"study_tag={lr_tag}"]
            add([py, "train.py", f"experiment={exp}", *c, *args], tag + lr_tag,
                STUDY / (tag + lr_tag) / "model" / "config.json")
    add([py, "attribute.py", "experiment=ssah/attribute_aligned", *scale["attribute"]], "attribute_aligned",
        STUDY / "attribute_aligned" / "unit_map.safetensors")
    for seed in seeds:
        for kind, exp in (("benign", "ssah/finetune_benign"), ("aoa", "ssah/finetune_aoa")):
            for fr in FREEZES:
                tag = f"{kind}_{fr}_s{seed}"
                add([py, "train.py", f"experiment={exp}", f"freeze={fr}", f"seed={seed}", "freeze.seed=" + str(seed),
                     *c, *scale[kind]], tag, STUDY / tag / "model" / "config.json")
    ev = ["experiment=ssah/evaluate", *scale["eval"]]
    add([py, "evaluate.py", "model=smollm2_135m", "eval=suite", *scale["eval"],
         f"hydra.run.dir={os.path.relpath(STUDY / 'eval_shipped', ROOT)}"], "eval_shipped",
        STUDY / "eval_shipped" / "eval.json")
    for cond in [f"align_{m}{t}" for t in ALIGN_LRS for m in ("none", "ru_only")] + \
            [f"benign_{fr}_s{s}" for s in seeds for fr in FREEZES]:
        add([py, "evaluate.py", *ev, f"condition={cond}"], f"eval_{cond}", STUDY / f"eval_{cond}" / "eval.json")
    # The AOA models are attacked as Qi et al. do: with the identity-shift system prompt and template (also the
    # aligned model, as their baseline).
    ev_aoa = ["experiment=ssah/evaluate_aoa", *scale["eval"]]
    for cond in ["align_none"] + [f"aoa_{fr}_s{s}" for s in seeds for fr in FREEZES]:
        add([py, "evaluate.py", *ev_aoa, f"condition={cond}"], f"eval_{cond}_aoaprompt",
            STUDY / f"eval_{cond}_aoaprompt" / "eval.json")
    for cls in ABLATED:
        add([py, "evaluate.py", "experiment=ssah/ablate", f"ablate.classes={cls}", *scale["eval"]], f"ablate_{cls}",
            STUDY / f"ablate_{cls}" / "eval.json")
    # Controls: random unit sets as large as each ablated class (a class is compared only with its own size).
    for cls in ABLATED:
        for s in random_seeds:
            add([py, "evaluate.py", "experiment=ssah/ablate_random", f"ablate.random_like={cls}", f"ablate.seed={s}",
                 *scale["eval"]], f"ablate_random_{cls}_s{s}", STUDY / f"ablate_random_{cls}_s{s}" / "eval.json")
    return plan


@friendly_errors
def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42], help="seeds of the fine-tuning runs")
    ap.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of random ablations")
    ap.add_argument("--resume", action="store_true",
                    help="skip stages whose outputs exist and whose config hash is unchanged (rerun the others)")
    ap.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    scale = CPU if args.scale == "cpu" else GPU
    t0 = time.time()
    plan = stages(scale, args.seeds, args.random_seeds)
    if not args.report_only:
        for cmd, name, done in plan:
            run(cmd, name, done, args.force, args.resume)
    path = write_report(STUDY, RESULTS, args.seeds, args.random_seeds, list(ALIGN_LRS),
                        [(name, pretty(cmd)) for cmd, name, _ in plan],
                        None if args.report_only else (time.time() - t0) / 60)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
