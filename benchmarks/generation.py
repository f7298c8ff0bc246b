"""Batched greedy generation vs a one-prompt-at-a-time loop, in one run (goal: >= 5x on CPU).

    python benchmarks/generation.py [--model smollm2|tiny] [--n 16] [--batch 16] [--max-new-tokens 64]

Both use the same prompts (AdvBench) and greedy decoding with the KV cache; the batched run left-pads. Also
reports whether both produced the same text (they should, up to floating-point ties).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safety_units.data.chat import prompt_text  # noqa: E402

from safety_units.data.sources import Source  # noqa: E402
from safety_units.data.generation import generate  # noqa: E402
from safety_units.models.loading import build_tiny, load_smollm2  # noqa: E402

CACHE = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_smollm2(CACHE) if args.model == "smollm2" else build_tiny(CACHE)
    src = Source.from_config({"path": str(ROOT.parent / "shared/data/advbench/harmful_behaviors.csv"),
                              "prompt": "goal", "response": None, "limit": args.n}, "advbench")
    prompts = [prompt_text(loaded.tokenizer, ex.messages) for ex in src.load(0)]
    kw = dict(max_new_tokens=args.max_new_tokens, progress=False)
    generate(loaded.model, loaded.tokenizer, prompts[:2], batch_size=2, **kw)  # warm-up
    t0 = time.perf_counter()
    batched = generate(loaded.model, loaded.tokenizer, prompts, batch_size=args.batch, **kw)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [generate(loaded.model, loaded.tokenizer, [p], batch_size=1, **kw)[0] for p in prompts]
    t_single = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(batched, single))
    print(f"model={args.model} prompts={len(prompts)} batch={args.batch} max_new_tokens={args.max_new_tokens} "
          f"threads={torch.get_num_threads()}")
    print(f"batched: {t_batched:.1f}s   one at a time: {t_single:.1f}s")
    print(f"speed ratio (one-at-a-time time / batched time): {t_single / t_batched:.2f}x")
    print(f"identical completions: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
