"""Cost of each scorer, relative to wifv, in one run: a whole attribution (safety and utility side, classification;
for contrast also loading its reference model) on the same model and calibration data (benchmarks/scorers.py is
the command line; the validity harness writes its cost.json with it).

Scorers: attribution.SCORER_RUNS -- wifv (tokens=all and tokens=decision), activation (tokens=decision), snip,
contrast, refusal_direction (the settings of results/attribution_validity.md), delta, atp and mask at their config
defaults -- and mask, atp and activation (tokens=decision) with attention heads as units. Each runs
`attribution.attribute` in a fresh process (peak_memory.in_fresh_process); time counts from the call (the model
loaded, one warm-up forward done) to its return, and peak extra memory is peak RSS minus RSS just before, sampled
every 2 ms. The table: samples scored per second (both sides) and peak extra MB, each also as a ratio to wifv.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from safety_units.attribution.pipeline import SCORER_RUNS, attribute, attribution_config
from safety_units.experiments.benchmarks.peak_memory import in_fresh_process, timed_peak
from safety_units.experiments.validity.plan import HEAD_SCORERS
from safety_units.models.loading import load_model

SCORERS = {**SCORER_RUNS, **{f"{s}_heads": [*SCORER_RUNS[s], "units.heads=true"] for s in HEAD_SCORERS}}
BASELINE = "wifv"


def measure(name: str, overrides: list[str]) -> dict:
    """One scorer's samples per second (both sides) and peak extra MB (run it in a fresh process: `compare`)."""
    cfg = attribution_config([*SCORERS[name], *overrides])
    loaded = load_model(cfg.model)
    probe = loaded.tokenizer("Hello there", return_tensors="pt")
    with torch.no_grad():  # warm-up: one-time kernel and thread-pool allocations do not count
        loaded.model(**probe)
    seconds, peak_mb = timed_peak(lambda: attribute(loaded, cfg))
    n = 2 * int(cfg.calibration.nsamples)  # safety + utility side
    return {"scorer": name, "samples_per_s": n / seconds, "peak_extra_mb": peak_mb,
            "seconds": seconds, "samples": n}


def compare(model_path: Path, scorers: list[str], nsamples: int, max_length: int, threads: int,
            overrides: list[str]) -> dict[str, dict]:
    """wifv and the given scorers, each in a fresh process with `threads` torch threads: scorer -> its row."""
    common = ["model=hf", f"model.path={model_path.resolve()}", f"calibration.nsamples={nsamples}",
              f"calibration.max_length={max_length}", *overrides]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return {name: in_fresh_process(measure, env=env, name=name, overrides=common)
            for name in dict.fromkeys([BASELINE, *scorers])}


def table(rows: dict[str, dict]) -> str:
    base = rows[BASELINE]
    lines = ["| scorer | samples/s | throughput vs wifv | peak extra MB | memory vs wifv | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base['samples_per_s']:.2f}x | "
                     f"{r['peak_extra_mb']:.0f} | {r['peak_extra_mb'] / max(base['peak_extra_mb'], 1e-9):.2f}x | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def write_json(path: Path, rows: dict[str, dict], settings: dict) -> None:
    """The measured rows with their settings (the validity report's cost table reads this file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
