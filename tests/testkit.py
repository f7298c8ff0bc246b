"""Helpers shared by test files of several folders: the exactness settings of the freezing tests, the tiny model's
loaded weights, which units moved, and a small safety / utility set pair."""
import json

import torch
from conftest import compose

from safety_units.models.loading import build_tiny
from safety_units.units.groups import resolve_units

# every step of the exactness tests: decoupled weight decay, accumulation, clipping (the masking pitfalls)
EXACT = ["optim.weight_decay=0.1", "optim.lr=5e-3", "trainer.accumulate_grad_batches=2",
         "trainer.gradient_clip_val=0.5", "trainer.max_steps=4"]


def loaded_weights():
    cache = compose("train", ["model=tiny"]).paths.cache_dir
    return {k: v.clone() for k, v in build_tiny(cache_dir=cache).model.state_dict().items()}


def unit_deltas(model, exported, loaded):
    """Per unit group: which units' parameter slices changed at all, from the exported weights."""
    out = {}
    for g in resolve_units(model):
        moved = torch.zeros(g.n, dtype=torch.bool)
        for sl in g.slices:
            diff = exported[sl.name] != loaded[sl.name]
            moved |= diff.any(dim=1 - sl.dim) if diff.ndim == 2 else diff
        out[g.key] = moved
    return out


MARKER = " Zyzzyva"  # a rare word: its tokens appear only in the safety calibration texts


def write_sets(tmp_path):
    """safety.jsonl (refusals carrying MARKER) and utility.jsonl (benign answers) of 12 rows each, in tmp_path."""
    safety = [{"prompt": f"Harmful request number {i}?", "response": f"No.{MARKER}{MARKER} I refuse{MARKER}."}
              for i in range(12)]
    utility = [{"prompt": f"Benign question number {i}?", "response": f"Sure, the answer is {i * 7} apples."}
               for i in range(12)]
    for name, rows in (("safety", safety), ("utility", utility)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "safety.jsonl", tmp_path / "utility.jsonl"
