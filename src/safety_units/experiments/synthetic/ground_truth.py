"""Ground truth for the scorers on the synthetic model (issue 27): plant a unit set S by safety fine-tuning the
pretrained model with only S trainable (`freeze=train_only freeze.random_share`), so that S is, by construction,
where the learnt refusal of unsafe task x concept inputs lives; then attribute the planted model with every scorer
and measure the precision of its top-|S| units against S (safety_units.units.stability.planted_recovery), next to chance.

The calibration sets are the world's own rows, written as JSONL under the run dir (another generator seed than
the fine-tune's and the evaluation's): safety = unsafe inputs answered `refuse`, utility = safe inputs answered,
harmless = safe prompts. `contrast` and `delta` compare against the pretrained model (the planted run's start).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from safety_units.experiments.synthetic.world import World, write_jsonl

PLANTED_SHARE = 0.02   # |S| = 2% of each unit kind, as the SmolLM2 planted test (scripts/planted_units.py)
PLANTED_SEED = 0
CALIBRATION_N = 64       # rows per calibration set (calibration.nsamples)
CALIBRATION_SEED = 1000  # World.safety's seed for the calibration rows (fine-tunes use 0..2, evaluation 1 in its own
                         # stream)


def calibration_overrides(world: World, out: Path, n: int) -> list[str]:
    """Write the world's calibration sets under out/ and return the attribute.yaml overrides that read them."""
    out.mkdir(parents=True, exist_ok=True)
    rows = world.safety(2 * n, seed=CALIBRATION_SEED)
    answer = {False: [], True: []}
    for r in rows:
        answer[r["unsafe"]].append(r)
    sets = {"safety": [{"prompt": r["prompt"], "response": "refuse"} for r in answer[True]][:n],
            "utility": [{"prompt": r["prompt"], "response": r["response"]} for r in answer[False]][:n],
            "harmless": [{"prompt": r["prompt"]} for r in answer[False]][:n]}
    over = []
    for name, part in sets.items():
        path = out / f"{name}.jsonl"
        write_jsonl(part, path)
        over += [f"calibration.{name}.path={path}", f"calibration.{name}.prompt=prompt",
                 f"calibration.{name}.response={'null' if name == 'harmless' else 'response'}"]
        if name != "harmless":
            over.append(f"calibration.{name}.input=null")
        over += [f"~calibration.{name}.hash_split", f"~calibration.{name}.on_bad_row"] if name == "utility" else []
    return over


def planted_finetune(loaded, model_overrides: list[str], out: Path, train_overrides: list[str]):
    """Safety fine-tune (SFT) with only a seeded random PLANTED_SHARE of units trainable; exported to out/model with
    trained_units.safetensors. Returns (tuned model, S, the fit summary)."""
    from safety_units.utils.config import compose_config  # here: the report alone needs no training stack
    from safety_units.units.stability import load_planted  # here: as above
    from safety_units.training.fit import fit  # here: as above (Lightning)

    over = ["~experiment", "model=synthetic", *model_overrides, "data=synthetic", "seed=0", "logger=none",
            "callbacks=none", "export=true", "trainer.enable_progress_bar=false", f"paths.output_dir={out}",
            *train_overrides, "freeze=train_only", f"freeze.random_share={PLANTED_SHARE}", f"freeze.seed={PLANTED_SEED}"]
    summary, tuned = fit(compose_config("train", over), loaded=copy.deepcopy(loaded))
    planted, _, _ = load_planted(out / "model")
    return tuned, planted, summary


def scorer_precision(tuned, tokenizer, planted, reference_dir: Path, calibration: list[str],
                     model_overrides: list[str], scorers: dict[str, list[str]] | None = None,
                     nsamples: int = 64) -> dict[str, dict]:
    """Per scorer: planted_recovery of its unit map of the planted model (precision of its top-|S| units by the
    safety rank and by the safety-minus-utility rank) and the seconds it took."""
    from safety_units.attribution.pipeline import REFERENCE_METHODS, SCORER_RUNS, attribute, attribution_config  # here: as above
    from safety_units.models.loading import LoadedModel  # here: as above
    from safety_units.units.stability import planted_recovery  # here: as above

    out = {}
    for name, over in (scorers or SCORER_RUNS).items():
        ref = [f"scoring.reference_path={reference_dir}"] if name in REFERENCE_METHODS else []
        cfg = attribution_config(["model=synthetic", *model_overrides, *over, *ref, *calibration,
                                  f"calibration.nsamples={nsamples}", "calibration.max_length=48", "device=cpu"])
        t0 = time.perf_counter()
        um = attribute(LoadedModel(copy.deepcopy(tuned), tokenizer, "planted"), cfg)
        out[name] = planted_recovery(planted, um) | {"seconds": round(time.perf_counter() - t0, 1)}
    return out
