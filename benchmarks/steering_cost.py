"""The cost of steering at generation time (steer=none, scans, refusal_ablation), in one run on the same model and
prompts: tokens/s (safety_units.experiments.benchmarks.steering_cost says how it is timed).

    python benchmarks/steering_cost.py [--model-path logs/align_quick/model] [--prompts 32] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.experiments.benchmarks.steering_cost import measure, report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="an exported model dir (default: the shipped SmolLM2)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from safety_units.models.loading import load_hf, load_model
    from safety_units.utils.config import compose_config

    loaded = load_hf(args.model_path) if args.model_path else load_model(compose_config("evaluate").model)
    best = measure(loaded, args.prompts, args.new_tokens, args.batch, args.repeats)
    print(report(best, f"model {loaded.name}: {args.prompts} prompts x {args.new_tokens} new tokens, batch "
                       f"{args.batch}, {torch.get_num_threads()} threads"))
    return best


if __name__ == "__main__":
    main()
