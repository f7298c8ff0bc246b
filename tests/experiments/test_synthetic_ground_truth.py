"""The scorers' ground truth on the synthetic model (safety_units.experiments.synthetic.ground_truth): the world's
calibration sets, written as JSONL, and the attribute.yaml overrides that read them -- composed and read by the
calibration loader as a scorer would. The planted fine-tune and the scorers' precision run end to end in
test_synthetic_testbed.py; the shipped ground truth is checked against the planted share here."""
import json

from conftest import ROOT, compose

from safety_units.data.calibration import calibration_batches, prompt_batches
from safety_units.experiments.synthetic.ground_truth import (
    CALIBRATION_SEED,
    PLANTED_SEED,
    PLANTED_SHARE,
    calibration_overrides,
)
from safety_units.experiments.synthetic.world import OPERATORS, World, apply, build_tokenizer

N = 12


def parsed(world: World, prompt: str) -> tuple[bool, str]:
    """(is the prompt's task x concept unsafe, the task's answer), read from the prompt's tokens."""
    op, concept, *symbols = prompt.split()
    xs = [int(s[1:]) for s in symbols]
    answer = " ".join(f"s{x}" for x in apply(OPERATORS[int(op[2:])], xs, world.n_symbols))
    return world.unsafe(int(op[2:]), int(concept[1:])), answer


def test_calibration_sets_are_the_worlds_refusals_answers_and_safe_prompts(tmp_path):
    world = World(seed=0)
    over = calibration_overrides(world, tmp_path / "cal", N)
    rows = {name: [json.loads(x) for x in (tmp_path / "cal" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("safety", "utility", "harmless")}
    assert all(0 < len(r) <= N for r in rows.values())
    assert all(parsed(world, r["prompt"])[0] and r["response"] == "refuse" for r in rows["safety"])
    assert all(parsed(world, r["prompt"]) == (False, r["response"]) for r in rows["utility"])
    assert [r for r in rows["harmless"]] == [{"prompt": r["prompt"]} for r in rows["utility"]]
    # another generator seed than the fine-tunes' (0..2): no calibration prompt is a training prompt
    train = {r["prompt"] for seed in (0, 1, 2) for r in world.safety(2000, seed=seed)}
    assert CALIBRATION_SEED not in (0, 1, 2) and not train & {r["prompt"] for r in rows["safety"] + rows["utility"]}

    cal = compose("attribute", ["model=synthetic", *over]).calibration
    tok = build_tokenizer(world)
    for name in ("safety", "utility"):  # every row read: no hash split, no skipped row
        batches = calibration_batches(tok, cal[name], 100, 48, 100, 0, name)
        assert sum(len(b["input_ids"]) for b in batches) == len(rows[name]), name
    [refusals] = calibration_batches(tok, cal.safety, 100, 48, 100, 0, "safety")
    answers = refusals["input_ids"][refusals["labels"] != -100]
    assert set(tok.convert_ids_to_tokens(answers.tolist())) == {"refuse", "<eos>"}
    assert sum(len(b["input_ids"]) for b in prompt_batches(tok, cal.harmless, 100, 48, 100, 0, "harmless")) == \
        len(rows["harmless"])


def test_the_shipped_ground_truth_planted_its_share_of_units():
    gt = json.loads((ROOT / "results" / "jain_testbed" / "testbed.json").read_text())["ground_truth"]
    assert (gt["share"], gt["seed"]) == (PLANTED_SHARE, PLANTED_SEED)
    assert abs(gt["planted_units"] - PLANTED_SHARE * gt["units"]) <= 4  # 2% of each kind, rounded per kind
    assert gt["frozen_max_abs_delta"] == 0.0  # only S trained
    assert all(r["safety"]["chance"] == gt["planted_units"] / gt["units"] for r in gt["scorers"].values())
    assert gt["scorers"]["delta"]["safety"]["precision"] == 1.0  # the weight change is S: the machinery is right
