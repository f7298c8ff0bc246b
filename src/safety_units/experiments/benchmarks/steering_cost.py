"""The cost of steering at generation time, in one run on the same model and prompts: tokens/s with steer=none,
steer=scans (one extra forward per prompt batch for sigma(q), plus vector additions) and steer=refusal_ablation
(a projection after every residual write). benchmarks/steering_cost.py is the command line.

The steering artifacts are fitted first (and cached), outside the timing. Each method generates the same prompts
(OKTest's, as eval=scans reads them) `repeats` times, interleaved so drift hits all alike; the best rate of each
counts. Greedy decoding with a token limit and no stop token, so every method generates the same number of tokens.
"""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig

from safety_units.steering.prompt_states import anchor_prompts, chat_ids, left_pad
from safety_units.steering.steerer import fitted, steering
from safety_units.utils.config import compose_config

METHODS = ("none", "scans", "refusal_ablation")


def tokens_per_second(model, tok, cfgs: dict, rows: list, new_tokens: int, batch: int, repeats: int) -> dict:
    """method -> its best generation rate (new tokens per second) over `repeats` interleaved passes of `rows`."""
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    best = {m: 0.0 for m in cfgs}
    for _ in range(repeats):
        for m, cfg in cfgs.items():
            with steering(model, tok, cfg), torch.inference_mode():
                t0, n = time.perf_counter(), 0
                for b in range(0, len(rows), batch):
                    ids, mask = left_pad(rows[b:b + batch], tok.pad_token_id)
                    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
                    n += (out.shape[1] - ids.shape[1]) * ids.shape[0]
                best[m] = max(best[m], n / (time.perf_counter() - t0))
    return best


def measure(loaded, prompts: int, new_tokens: int, batch: int, repeats: int) -> dict:
    """Fit the steerers (outside the timing), then time every method on the same OKTest prompts."""
    cfgs = {m: compose_config("evaluate", [f"steer={m}"]).steer for m in METHODS}
    for m in METHODS[1:]:
        fitted(loaded.model, loaded.tokenizer, cfgs[m])
    source = compose_config("evaluate", ["eval=scans"]).eval.tasks.oktest.source
    rows = chat_ids(loaded.tokenizer, anchor_prompts(source, prompts, 0, "oktest"))
    return tokens_per_second(loaded.model, loaded.tokenizer, cfgs, rows, new_tokens, batch, repeats)


def report(best: dict, header: str) -> str:
    return "\n".join([header] + [f"  {m:18s} {rate:8.1f} tokens/s   {rate / best['none']:.3f}x steer=none"
                                 for m, rate in best.items()])
