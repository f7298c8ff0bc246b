"""The synthetic testbed's pretraining time (issue 27: <= 20 minutes on 2 CPU cores), measured from scratch in a
fresh cache dir with conf/model/synthetic.yaml as it is (or --model-set overrides).

    python benchmarks/synthetic_pretraining.py [--threads 2] [--model-set model.pretraining.steps=4000]

Prints the wall time (data generation, pretraining, the accuracy check and the save: everything `model=synthetic`
does on a cache miss), the seconds per step, the task accuracy per input group, and the ratio to the 20-minute
budget. Run it on an otherwise idle machine: other jobs on the cores slow it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
BUDGET_S = 20 * 60


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    import torch

    from safety_units.utils.config import compose_config
    from safety_units.models.loading import load_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("train", ["model=synthetic", f"paths.cache_dir={tmp}", "model.progress=false",
                                       *args.model_set]).model
        t0 = time.perf_counter()
        loaded = load_model(cfg)
        wall = time.perf_counter() - t0
        report = json.loads(next(Path(tmp, "synthetic").glob("*/model/pretraining.json")).read_text())
    steps = report["steps"]
    print(f"threads {args.threads}; {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.2f}M parameters")
    print(f"pretraining: {steps} steps, final loss {report['final_loss']:.4f}")
    print(f"wall time {wall:.0f} s (steps alone {report['seconds']:.0f} s, {report['seconds'] / steps:.3f} s/step)")
    print("task accuracy: " + ", ".join(f"{g} {a:.3f}" for g, a in report["task_accuracy"].items()))
    print(f"ratio to the {BUDGET_S // 60}-minute budget: {wall / BUDGET_S:.2f}")


if __name__ == "__main__":
    main()
