"""scoring=mask (attribution.mask): a learned unit mask that breaks refusal and keeps utility; seeded, resumable."""

import pytest
import torch
from conftest import compose
from planted import PLANT, SORRY, attribute_cfg, sorry_refusals
from planted import planted_dirs  # noqa: F401  (a fixture)

from safety_units.attribution.scorer import ScoringRun, build_scorer
from safety_units.attribution.mask import MaskScorer
from safety_units.attribution.pipeline import run_attribution
from safety_units.attribution.selection import ablation_selection
from safety_units.models.loading import load_hf
from safety_units.units.groups import resolve_units
from safety_units.units.unit_map import UnitMap
from safety_units.utils.errors import ConfigError


@pytest.mark.parametrize("planted_dirs", [SORRY], indirect=True)
@pytest.mark.parametrize("model", ["aligned", "base"])
def test_the_learned_mask_removes_the_planted_unit_and_nothing_without_a_safety_signal(planted_dirs, model):
    """scoring=mask on refusals that start with the planted unit's token ("Sorry", the decision window's one
    token): on the planted model the optimiser removes that unit -- first among all MLP units, and the only one; on
    its base model, which never says it, the refusal is already past the target, so the penalty keeps the mask
    empty."""
    root, dirs = planted_dirs
    cfg = attribute_cfg(root, dirs, "scoring=mask", f"calibration.safety.path={sorry_refusals(root)}",
                        "scoring.decision_tokens=0", "scoring.steps=60", f"model.path={dirs[model]}")
    out = run_attribution(cfg)
    um = UnitMap.load(out["unit_map"])
    found = um.metadata["mask"]
    if model == "aligned":
        mlp = torch.cat([um.safety[f"mlp.{layer}"] for layer in range(2)])
        assert int(mlp.argmax()) == 128 + PLANT
        assert found["mask_units"] == {"attn": 0, "mlp": 1} and found["final"]["refusal_logodds"] < 0
        # the reached mask is saved for evaluate.py: ablate.selection zeroes exactly that unit
        ecfg = compose("evaluate", ["model=hf", f"model.path={dirs[model]}", f"ablate.unit_map={out['unit_map']}",
                                    f"ablate.selection={root / 'run' / 'mask_units.safetensors'}"])
        sel, what = ablation_selection(ecfg, load_hf(str(dirs[model])).model, None)
        assert [(k, int(i)) for k, v in sel.items() for i in v.nonzero().flatten()] == [("mlp.1", PLANT)]
        assert what["units"]["mlp"]["units"] == 1
    else:
        assert found["mask_units"] == {"attn": 0, "mlp": 0} and found["final"]["removed_share"] < 0.01


def test_the_learned_mask_resumes_bit_identically(tmp_path):
    """An interrupted scoring=mask run (its state saved every 3 steps) continued to 6 steps in the same run dir
    ends exactly where an uninterrupted 6-step run does."""
    def run(out, steps):
        cfg = compose("attribute", ["model=tiny", "calibration.nsamples=8", "calibration.max_length=48",
                                    "scoring=mask", f"scoring.steps={steps}", "scoring.checkpoint_every=3"],
                      output_dir=out)
        return UnitMap.load(run_attribution(cfg)["unit_map"])

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "parts", 3)
    state = torch.load(tmp_path / "parts" / "mask_state.pt", weights_only=False)
    assert state["step"] == 3
    resumed = run(tmp_path / "parts", 6)
    assert all(torch.equal(whole.safety[k], resumed.safety[k]) for k in whole.keys)
    assert not all(torch.equal(whole.safety[k], run(tmp_path / "short", 3).safety[k]) for k in whole.keys)
    # a run resumed at its last step (nothing left to do) still reports the loss terms it ended with
    (tmp_path / "parts" / "unit_map.safetensors").unlink()
    done = run(tmp_path / "parts", 6)
    assert done.metadata["mask"]["final"] == resumed.metadata["mask"]["final"] != {}


@pytest.mark.parametrize("planted_dirs", [SORRY], indirect=True)
def test_with_heads_as_units_the_mask_cuts_the_planted_unit_not_the_marker_head(planted_dirs):
    """units.heads=true: the mask, free to remove any unit, takes the cheaper cut -- the one planted MLP unit, which
    breaks the refusal without touching the marker head's 15 other channels -- and no head."""
    root, dirs = planted_dirs
    out = run_attribution(attribute_cfg(root, dirs, "scoring=mask", "units.heads=true", "scoring.decision_tokens=0",
                                        f"calibration.safety.path={sorry_refusals(root)}", "scoring.steps=60"))
    um = UnitMap.load(out["unit_map"], model=load_hf(str(dirs["aligned"])).model)
    mlp = torch.cat([um.safety[f"mlp.{layer}"] for layer in range(2)])
    assert int(mlp.argmax()) == 128 + PLANT and um.metadata["mask"]["mask_units"] == {"head": 0, "mlp": 1}


def test_mask_settings_are_checked_when_the_scorer_is_built_and_utility_none_scores_zero(tiny):
    for override, match in (("+scoring.stepz=3", "scoring.stepz is not a setting of scoring=mask"),
                            ("scoring.utility=kl", "scoring.utility must be activation or none"),
                            ("scoring.lr=0", "scoring.lr must be > 0")):
        with pytest.raises(ConfigError, match=match):
            build_scorer(compose("attribute", ["scoring=mask", override]).scoring)
    scorer = MaskScorer("mask", utility="none")
    groups = resolve_units(tiny.model)
    utility = scorer.utility(ScoringRun(tiny.model, groups))  # no batches needed: every unit's utility is 0
    assert {k: v.shape for k, v in utility.items()} == {g.key: (g.n,) for g in groups}
    assert all(float(v.abs().sum()) == 0.0 for v in utility.values())
