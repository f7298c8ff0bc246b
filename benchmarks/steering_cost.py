"""The cost of steering at generation time, in one run on the same model and prompts: tokens/s with steer=none,
steer=scans (one extra forward per prompt batch for sigma(q), plus vector additions) and steer=refusal_ablation
(a projection after every residual write).

    python benchmarks/steering_cost.py [--model-path logs/align_quick/model] [--prompts 32] [--new-tokens 32]

The steering artifacts are fitted first (and cached), outside the timing. Each method generates the same prompts
`--repeats` times (interleaved, so drift hits all alike); the best rate of each counts. Greedy decoding with a
token limit and no stop token, so every method generates the same number of tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="an exported model dir (default: the shipped SmolLM2)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch
    from transformers import GenerationConfig

    from safety_units.utils.config import compose_config
    from safety_units.models.loading import load_hf, load_model
    from safety_units.steering.prompt_states import anchor_prompts, chat_ids, left_pad
    from safety_units.steering.scans import fitted, steering

    cfgs = {m: compose_config("evaluate", [f"steer={m}"]).steer for m in ("none", "scans", "refusal_ablation")}
    loaded = load_hf(args.model_path) if args.model_path else load_model(compose_config("evaluate").model)
    model, tok = loaded.model, loaded.tokenizer
    for m in ("scans", "refusal_ablation"):
        fitted(model, tok, cfgs[m])
    source = compose_config("evaluate", ["eval=scans"]).eval.tasks.oktest.source
    rows = chat_ids(tok, anchor_prompts(source, args.prompts, 0, "oktest"))
    gen = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    best = {m: 0.0 for m in cfgs}
    for _ in range(args.repeats):
        for m, cfg in cfgs.items():
            with steering(model, tok, cfg), torch.inference_mode():
                t0, n = time.perf_counter(), 0
                for b in range(0, len(rows), args.batch):
                    ids, mask = left_pad(rows[b:b + args.batch], tok.pad_token_id)
                    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
                    n += (out.shape[1] - ids.shape[1]) * ids.shape[0]
                best[m] = max(best[m], n / (time.perf_counter() - t0))
    print(f"model {loaded.name}: {args.prompts} prompts x {args.new_tokens} new tokens, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    for m, rate in best.items():
        print(f"  {m:18s} {rate:8.1f} tokens/s   {rate / best['none']:.3f}x steer=none")


if __name__ == "__main__":
    main()
