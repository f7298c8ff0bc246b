"""Helpers shared by several test files: the exactness settings of the freezing tests, the tiny model and its loaded
weights, which units moved, a small safety / utility set pair, data sources from keywords, a stand-in for
self-distilled answers, and a few constants."""
import json

import pytest
import torch
from conftest import SHARED_DATA, compose

from safety_units.data.sources import Source
from safety_units.models.loading import build_tiny
from safety_units.units.groups import resolve_units

# every step of the exactness tests: decoupled weight decay, accumulation, clipping (the masking pitfalls)
EXACT = ["optim.weight_decay=0.1", "optim.lr=5e-3", "trainer.accumulate_grad_batches=2",
         "trainer.gradient_clip_val=0.5", "trainer.max_steps=4"]
LONG = " ".join(["word"] * 30)  # 30 words: past the judges' minimum length (20) and their 80-character opening
HEADS = {"heads": True}  # units.heads=true: attention heads as units
needs_hft_data = pytest.mark.skipif(not (SHARED_DATA / "hft").is_dir(), reason="needs ../shared/data/hft")


def tiny_model():
    """model=tiny's model, freshly built (the same random weights every call)."""
    return build_tiny(cache_dir=compose("train", ["model=tiny"]).paths.cache_dir).model


def src(**kw):
    """A data source from its settings as keywords (named `test` unless `name` is given)."""
    return Source.from_config(kw, kw.pop("name", "test") if "name" in kw else "test")


def fake_own_answers(model, tokenizer, examples, cache_dir=None, **kw):
    """Stand-in for the teacher's greedy answers (a tiny random model answers with nothing or noise)."""
    from safety_units.data.pairs import with_response

    return [with_response(ex, f"Sure, here is how to {ex.prompt[:20]}") for ex in examples]


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
