"""The runs behind results/attribution_validity.md (issues 12 and 23) on CPU, resumable: every step skips what is
done (a unit map that exists, a dose point with eval.json, a mask run resumes from its mask_state.pt).
scripts/run_attribution_validity.py is the command line; paths are relative to the repository root.

Needs two trained models (run them first, each ~5-10 min on 2 cores):

    python train.py freeze=none callbacks=default logger=csv hydra.run.dir=logs/align_full      # full alignment
    python train.py freeze=train_only freeze.random_share=0.02 freeze.seed=0 callbacks=default logger=csv \\
        optim.lr=1e-3 data.num_samples=640 hydra.run.dir=logs/planted2                          # planted 2% set

Lanes (`LANES`): `maps` (unit maps: the new scorers of the aligned and planted models, disjoint calibration halves,
calibration sources, the earlier scorers, the mask's sparsity sweep), `evals` (dose sweeps against the shared
controls, the head maps' own controls and sweeps, the planted eval, the earlier scorers' planted maps, cost, the
reached masks' evals) and `regen` (the shipped random sets at 1% and 2% generated again, for the second judge) run
side by side, two of them with one torch thread each on 2 cores; then `artifacts` (logs -> results: every dose
point's eval.json / eval_meta.json, the planted, stability, sparsity and cost inputs, the strings judge's
re-judging) and `report`, which rebuilds the report from results/ alone. A lane waits for the files the others
write (polling); one that fails stops with its log named, and the others stop when they would wait for it: rerun
to resume. Dose points already in <results>/runs (the shipped sweeps and shared random controls) are copied in and
not rerun. The scorers are attribution.SCORER_RUNS (the mask at calibration batch 4, and `mask_logit`, the same
mask ranked by its removal logit alone); the dose evals drop the harmless over-refusal task (OKTest stays), about a
third of each point's time; the head sweeps and the reached masks read only ASR and perplexity.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from safety_units.attribution.pipeline import SCORER_RUNS
from safety_units.experiments.validity.artifacts import SECOND_JUDGE_DIR, extract
from safety_units.experiments.validity.report import HALVES, write_report
from safety_units.utils.errors import SafetyUnitsError

MASK_BATCH = ["calibration.batch_size=4"]  # the mask's optimisation at calibration batch 4
SCORERS = {name: [*o, *(MASK_BATCH if name == "mask" else [])] for name, o in SCORER_RUNS.items()} | {
    "mask_logit": ["scoring=mask", *MASK_BATCH, "scoring.utility=none"]}  # the same mask, ranked by its logit alone
HEAD_SCORERS = ("mask", "atp", "activation_decision")  # heads as units: the scorers that apply
HEADS = {f"{s}_heads": [*SCORERS[s], "units.heads=true"] for s in HEAD_SCORERS}
OLD = ("wifv", "contrast", "snip", "refusal_direction", "wifv_decision", "activation_decision")
NEW = ("mask", "mask_logit", "atp", "delta")
HALF_SCORERS = ("atp", "delta", "wifv", "mask", "mask_logit")  # stability over disjoint calibration halves
HALF_SPLITS = {"a": ["+calibration.safety.hash_split=[0.0,0.5]", "calibration.utility.hash_split=[0.0,0.45]"],
               "b": ["+calibration.safety.hash_split=[0.5,1.0]", "calibration.utility.hash_split=[0.45,0.9]"]}
COST_SCORERS = [*OLD, "mask", "atp", "delta", "atp_heads", "activation_decision_heads"]  # mask's twins cost the same
MAIN_SPARSITY = "2.0"  # scoring=mask's default sparsity_weight: the main mask map
SECOND_JUDGE = {"shares": ("0.01", "0.02"), "seeds": (0, 1, 2)}
LANES = ("maps", "evals", "regen", "artifacts", "report")
PARALLEL = ("maps", "evals", "regen")


class StepFailed(SafetyUnitsError):
    """A step of the harness exited with an error (its log is named)."""


@dataclass
class Settings:
    aligned: Path = Path("logs/align_full/model")
    planted: Path = Path("logs/planted2/model")
    work: Path = Path("logs/validity")
    results: Path = Path("results/attribution_validity")
    calibration: list[str] = field(default_factory=lambda: ["calibration.nsamples=128", "calibration.max_length=192"])
    dose_eval: list[str] = field(default_factory=lambda: ["eval.tasks.harmless=null"])
    short_eval: list[str] = field(default_factory=lambda: ["eval.tasks.harmless=null", "eval.tasks.oktest=null"])
    sparsity: list[str] = field(default_factory=lambda: ["0.25", "1.0"])  # the mask's sparsity sweep
    head_shares: list[str] = field(default_factory=lambda: ["0.01", "0.02", "0.04"])  # 0.25%, 0.5%: one head
    python: str = sys.executable
    poll_s: float = 30.0    # how often a lane looks for another lane's output
    settle_s: float = 20.0  # and how long it then lets the writer finish


def run_logged(cmd: list[str], log: Path) -> int:
    """Run cmd with one torch thread, its output to log; the exit status."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode


class Harness:
    """The steps of the lanes; `runner(cmd, log) -> exit status` runs a command (tests pass their own)."""

    def __init__(self, s: Settings, runner=run_logged):
        self.s, self.runner, self.failed = s, runner, threading.Event()
        self.v = s.work

    def step(self, cmd: list[str], log: Path, what: str) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        if self.runner([self.s.python, *cmd], log) != 0:
            raise StepFailed(f"{what} failed: {log}")

    def wait_for(self, path: Path) -> None:
        while not path.exists():
            if self.failed.is_set():
                raise StepFailed(f"stopped waiting for {path}: another lane failed")
            time.sleep(self.s.poll_s)
        time.sleep(self.s.settle_s)  # let the writer finish

    def attribute(self, model: Path | str, run_dir: Path, overrides: list[str]) -> None:
        if (run_dir / "unit_map.safetensors").is_file():
            return
        if "mask_logit" in str(run_dir):  # the same optimisation as its mask twin: start from that run's last state
            twin = Path(str(run_dir).replace("mask_logit", "mask", 1))
            self.wait_for(twin / "unit_map.safetensors")
            run_dir.mkdir(parents=True, exist_ok=True)
            if (twin / "mask_state.pt").is_file() and not (run_dir / "mask_state.pt").exists():
                shutil.copyfile(twin / "mask_state.pt", run_dir / "mask_state.pt")
        which = ["model=smollm2_135m"] if model == "shipped" else ["model=hf", f"model.path={model}"]
        self.step(["attribute.py", *which, *self.s.calibration, *overrides, "logger=none", f"hydra.run.dir={run_dir}"],
                  Path(f"{run_dir}.log"), "attribution")

    def dose(self, unit_map: Path, runs: Path, controls: Path, out: Path, arms: list[str], shares: list[str],
             evals: list[str], log: Path, what: str) -> None:
        """A scripts/dose_response.py sweep of the aligned model (it skips the points that are done)."""
        self.step(["scripts/dose_response.py", "--model", str(self.s.aligned), "--unit-map", str(unit_map),
                   "--runs-dir", str(runs), "--controls-dir", str(controls), "--out", str(out), "--arms", *arms,
                   *(["--shares", *shares] if shares else []), "--", *evals], log, what)

    def sweep(self, name: str, controls: Path, shares: list[str], evals: list[str]) -> None:
        self.wait_for(self.v / "maps" / name / "unit_map.safetensors")
        self.dose(self.v / "maps" / name, self.v / "dose" / name, controls, self.s.results / "dose" / name,
                  ["safety_minus_utility", "random"], shares, evals, self.v / "dose" / f"{name}.log", "sweep")

    def evaluate(self, run_dir: Path, overrides: list[str], model: Path | None = None) -> None:
        """One evaluate.py run (of the aligned model unless `model`), skipped when done."""
        if (run_dir / "eval.json").is_file():
            return
        self.step(["evaluate.py", "model=hf", f"model.path={model or self.s.aligned}", *overrides, "logger=none",
                   f"hydra.run.dir={run_dir}"], Path(f"{run_dir}.log"), "evaluate")

    def mask_map(self, weight: str) -> Path:
        return self.v / "maps" / "mask" if weight == MAIN_SPARSITY else self.v / "sparsity" / f"w{weight}"

    def seed_shipped_runs(self) -> None:
        """The dose points already shipped (earlier sweeps, shared controls) are copied in, not rerun."""
        runs = self.s.results / "runs"
        if runs.is_dir():
            for f in sorted(runs.rglob("*")):
                dest = self.v / "dose" / f.relative_to(runs)
                if f.name in ("eval.json", "eval_meta.json") and not dest.is_file():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, dest)
        heads_base = self.v / "dose" / "controls_heads" / "base"  # the baseline does not depend on the unit kinds
        heads_base.mkdir(parents=True, exist_ok=True)
        for f in sorted((self.v / "dose" / "controls" / "base").glob("eval*.json")):
            if not (heads_base / f.name).exists():
                shutil.copyfile(f, heads_base / f.name)

    def lane_maps(self) -> None:
        s, v = self.s, self.v
        self.wait_for(s.aligned / "model.safetensors")
        for name in NEW:
            self.attribute(s.aligned, v / "maps" / name, SCORERS[name])
        for name, overrides in HEADS.items():
            self.attribute(s.aligned, v / "maps" / name, overrides)
        self.wait_for(s.planted / "trained_units.safetensors")
        for name in NEW:
            self.attribute(s.planted, v / "planted" / name, SCORERS[name])
        for name in HALF_SCORERS:
            for half, split in HALF_SPLITS.items():
                self.attribute(s.aligned, v / "stability" / f"{name}_half_{half}", [*SCORERS[name], *split])
        self.attribute(s.aligned, v / "stability" / "wei", ["scoring=wifv", "calibration=wei"])
        self.attribute(s.aligned, v / "stability" / "self", ["scoring=wifv", "calibration=self"])
        self.attribute("shipped", v / "stability" / "shipped", ["scoring=wifv"])
        for name in OLD:  # for the scorers' stability
            self.attribute(s.aligned, v / "maps" / name, SCORERS[name])
        for w in s.sparsity:
            self.attribute(s.aligned, v / "sparsity" / f"w{w}", [*SCORERS["mask"], f"scoring.sparsity_weight={w}"])

    def lane_evals(self) -> None:
        s, v = self.s, self.v
        self.wait_for(s.aligned / "model.safetensors")
        self.seed_shipped_runs()
        if (v / "dose" / "controls" / "base" / "eval.json").is_file():  # a retrained model's unablated eval
            self.evaluate(v / "verify_base", ["eval=dose", *s.dose_eval])
        for name in NEW:
            self.sweep(name, v / "dose" / "controls", [], s.dose_eval)
        self.wait_for(v / "maps" / "mask_heads" / "unit_map.safetensors")
        heads = v / "dose" / "controls_heads"
        self.dose(v / "maps" / "mask_heads", heads, heads, v / "dose" / "controls_heads_report", ["random"],
                  s.head_shares, s.short_eval, v / "dose" / "controls_heads.log", "head controls")
        for name in HEADS:  # their random sets: run above, shared
            self.sweep(name, heads, s.head_shares, s.short_eval)
        self.wait_for(s.planted / "trained_units.safetensors")
        self.evaluate(v / "planted_eval", ["eval=dose", "eval.tasks.oktest=null", "eval.tasks.harmless=null"],
                      model=s.planted)
        for name in OLD:
            self.attribute(s.planted, v / "planted" / name, SCORERS[name])
        if not (v / "cost.json").is_file():  # at the harness's settings
            self.step(["benchmarks/scorers.py", "--model-path", str(s.aligned), "--json", str(v / "cost.json"),
                       "--scorers", *COST_SCORERS, "--", *MASK_BATCH], v / "cost.log", "cost")
        for w in [MAIN_SPARSITY, *s.sparsity]:  # the mask the optimiser reached: its own size against its ASR
            m = self.mask_map(w)
            self.wait_for(m / "mask_units.safetensors")
            self.evaluate(v / "sparsity" / f"eval_w{w}", ["eval=dose", *s.short_eval, f"ablate.unit_map={m}",
                                                          f"ablate.selection={m}/mask_units.safetensors"])

    def regenerate_control(self, share: str, seed: int) -> Path:
        """A shipped random set's completions again (same model, same set): the shipped controls keep none."""
        run = self.v / "dose" / "controls_gen" / f"random_k{share}_s{seed}"
        self.evaluate(run, ["eval=dose", *self.s.short_eval, f"ablate.unit_map={self.v / 'maps' / 'mask'}",
                            "ablate.top=random", f"ablate.share={share}", f"ablate.seed={seed}"])
        return run

    def lane_regen(self) -> None:
        self.wait_for(self.v / "sparsity" / f"w{self.s.sparsity[-1]}" / "unit_map.safetensors")
        for k in SECOND_JUDGE["shares"]:
            for seed in SECOND_JUDGE["seeds"]:
                if not (self.v / "dose" / "controls" / f"random_k{k}_s{seed}" / "generations.jsonl").is_file():
                    self.regenerate_control(k, seed)

    def rejudge_strings(self) -> None:
        """The top sets at 1% and 2% and their random sets, re-judged by the strings judge (no model)."""
        out, dose = self.s.results / "runs" / SECOND_JUDGE_DIR, self.v / "dose"
        dirs = ["controls/base"]
        for k in SECOND_JUDGE["shares"]:
            dirs += [f"{name}/safety_minus_utility_k{k}" for name in [*NEW, *HEADS]]
            for seed in SECOND_JUDGE["seeds"]:
                dirs += [f"controls/random_k{k}_s{seed}", f"controls_heads/random_k{k}_s{seed}"]
        for d in dirs:
            src = dose / d
            if d.startswith("controls/random") and not (src / "generations.jsonl").is_file():
                k, seed = d.removeprefix("controls/random_k").split("_s")
                src = self.regenerate_control(k, int(seed))
            if not (src / "generations.jsonl").is_file() or (out / d / "eval.json").is_file():
                continue
            self.step(["evaluate.py", "eval=rejudge", f"eval.tasks.rejudge.source.path={src / 'generations.jsonl'}",
                       "eval.tasks.rejudge.source.prompt=prompt", "eval.tasks.rejudge.source.completion=completion",
                       "eval.tasks.rejudge.source.where={task: harmful}", "eval.tasks.rejudge.report=asr",
                       "judge=strings", "logger=none", f"hydra.run.dir={self.v / 'rejudge' / d}"],
                      self.v / "rejudge.log", "rejudge")
            (out / d).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.v / "rejudge" / d / "eval.json", out / d / "eval.json")
            if src != dose / d:  # the regenerated run's own verdicts
                shutil.copyfile(src / "eval.json", out / d / "source_eval.json")

    def artifacts(self) -> list[Path]:
        """logs -> results: every dose point's eval.json / eval_meta.json, the planted, stability, sparsity and cost
        inputs (small JSON; the maps stay in logs; a map not made is left out), then the second judge."""
        s, v, dose = self.s, self.v, self.v / "dose"
        for f in sorted(dose.rglob("*")):
            rel = f.relative_to(dose)
            if f.name in ("eval.json", "eval_meta.json") and rel.parts[0] not in ("controls_heads_report",
                                                                                   "controls_gen"):
                (s.results / "runs" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, s.results / "runs" / rel)

        def have(m: Path) -> bool:
            return (m / "unit_map.safetensors").is_file()

        def existing(items: dict[str, Path]) -> dict[str, Path]:
            return {k: m for k, m in items.items() if have(m)}

        planted = (v / "planted_eval" / "eval.json").is_file()
        comparisons = {f"{HALVES}{name}": {h: v / "stability" / f"{name}_half_{h[-1]}" for h in ("half_a", "half_b")}
                       for name in ("wifv", *NEW)}
        comparisons["calibration sources"] = {"stl": v / "maps" / "wifv", "wei": v / "stability" / "wei",
                                              "self": v / "stability" / "self"}
        comparisons["scorers"] = {name: v / "maps" / name for name in (*OLD, *NEW)}
        comparisons["shipped vs aligned"] = {"shipped": v / "stability" / "shipped", "aligned": v / "maps" / "wifv"}
        masks = {w: self.mask_map(w) for w in [MAIN_SPARSITY, *s.sparsity]
                 if have(self.mask_map(w)) and (v / "sparsity" / f"eval_w{w}" / "eval.json").is_file()}
        written = extract(s.results, planted=s.planted if planted else None,
                          planted_eval=v / "planted_eval" if planted else None,
                          planted_maps=existing({n: v / "planted" / n for n in (*NEW, *OLD)}) if planted else {},
                          stability={t: m for t, c in comparisons.items() if len(m := existing(c)) >= 2},
                          sparsity=masks, sparsity_evals=v / "sparsity" if masks else None,
                          cost=v / "cost.json" if (v / "cost.json").is_file() else None, model_run=s.aligned.parent,
                          retrain_eval=v / "verify_base" if (v / "verify_base" / "eval.json").is_file() else None)
        self.rejudge_strings()
        return written

    def report(self, out: Path | None = None) -> Path:
        """The report from <results> alone (at <results>.md unless `out`)."""
        runs = self.s.results / "runs"
        sweeps = {name: runs / name for name in (*OLD, *NEW) if (runs / name).is_dir()}
        heads = {name: runs / name for name in HEADS if (runs / name).is_dir()}
        return write_report(out or Path(f"{self.s.results}.md"), runs / "controls", sweeps, self.s.results,
                            runs / "controls_heads", heads)

    def run(self, lanes: list[str]) -> Path | None:
        """The lanes asked for: maps, evals and regen side by side, then artifacts, then the report."""
        threads, errors = [], []

        def lane(name: str) -> None:
            try:
                getattr(self, f"lane_{name}")()
            except Exception as e:  # noqa: BLE001 -- reported below, and the other lanes stop waiting
                errors.append(e)
                self.failed.set()

        for name in (n for n in PARALLEL if n in lanes):
            threads.append(threading.Thread(target=lane, args=(name,), name=name))
            threads[-1].start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        if "artifacts" in lanes:
            for p in self.artifacts():
                print(f"wrote {p}", flush=True)
        return self.report() if "report" in lanes else None
