"""Attribution cost per method, in one run on the same model and samples: throughput and peak extra memory
(benchmarks/attribution.py is the command line).

Methods: wifv, activation, snip (ours: per-unit sums, one dense gradient alive at a time, activation
checkpointing) and `naive_snip`, the per-weight baseline that keeps dense gradients and a dense score tensor for
every weight (as Wei et al. do) and reduces to units only at the end. Each method runs in a fresh process
(peak_memory.in_fresh_process); peak extra memory = peak RSS while scoring minus RSS just before (model and batches
loaded, one warm-up forward done), sampled every 2 ms. The table gives each method against naive SNIP.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from safety_units.attribution.one_set import score_units
from safety_units.data.calibration import calibration_batches
from safety_units.experiments.benchmarks.peak_memory import in_fresh_process, timed_peak
from safety_units.models.loading import build_tiny, load_smollm2
from safety_units.units.groups import resolve_units

CACHE = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))
METHODS = ["wifv", "activation", "snip", "naive_snip"]


def naive_snip(model, groups, batches) -> dict:
    """Per-unit SNIP the per-weight way: a dense |w * grad| per weight summed over batches, reduced at the end."""
    dense = {s.name: torch.zeros_like(s.param, dtype=torch.float32) for g in groups for s in g.slices}
    params = dict(model.named_parameters())
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        for name, acc in dense.items():  # a score per weight, like Wei et al.
            acc += (params[name].detach() * params[name].grad).abs()
    out = {}
    for g in groups:
        out[g.key] = sum(s.unit_values(dense[s.name]) for s in g.slices)
    model.zero_grad(set_to_none=True)
    return out


def measure(method: str, model_name: str, data_file: str, nsamples: int, batch: int, max_length: int) -> dict:
    """One method's samples per second and peak extra MB (run it in a fresh process: `compare`)."""
    loaded = load_smollm2(CACHE) if model_name == "smollm2" else build_tiny(CACHE)
    src = {"path": data_file, "prompt": "instruction", "input": "input", "response": "output"}
    batches = calibration_batches(loaded.tokenizer, src, nsamples, max_length, batch, 0, "safety")
    groups = resolve_units(loaded.model)
    with torch.no_grad():  # warm-up: one-time kernel and thread-pool allocations do not count
        loaded.model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    if method == "naive_snip":
        seconds, peak_mb = timed_peak(lambda: naive_snip(loaded.model, groups, batches))
    else:
        seconds, peak_mb = timed_peak(lambda: score_units(loaded.model, groups, batches, method, progress=False))
    n = sum(b["input_ids"].shape[0] for b in batches)
    return {"method": method, "samples_per_s": n / seconds, "peak_extra_mb": peak_mb,
            "seconds": seconds, "samples": n}


def compare(model_name: str, data_file: str, nsamples: int, batch: int, max_length: int) -> dict[str, dict]:
    """Every method, each in a fresh process: method -> its row."""
    return {m: in_fresh_process(measure, method=m, model_name=model_name, data_file=data_file, nsamples=nsamples,
                                batch=batch, max_length=max_length) for m in METHODS}


def table(rows: dict[str, dict], batch: int, max_length: int, model_name: str) -> str:
    base = rows["naive_snip"]
    lines = [f"model={model_name} samples={base['samples']} batch={batch} max_length={max_length}",
             "| method | samples/s | throughput vs naive SNIP | peak extra MB | memory vs naive SNIP |",
             "|---|---:|---:|---:|---:|"]
    for m, r in rows.items():
        lines.append(f"| {m} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base['samples_per_s']:.2f}x | "
                     f"{r['peak_extra_mb']:.0f} | {r['peak_extra_mb'] / max(base['peak_extra_mb'], 1e-9):.3f} |")
    return "\n".join(lines)
