"""The scorer interface (attribution.scorer): every conf/scoring option builds its scorer from `_target_`, a scorer
defined outside the package runs through attribute() from its config alone, and a bad `_target_` is a clear error."""

import pytest
import torch
from conftest import ROOT, compose
from omegaconf import OmegaConf, open_dict
from planted import tiny_cfg

from safety_units.attribution.scorer import ReferenceScorer, Scorer, ScoringRun, build_scorer
from safety_units.attribution.pipeline import REFERENCE_METHODS, SCORER_RUNS, attribute
from safety_units.utils.errors import ConfigError

SCORING_OPTIONS = sorted(p.stem for p in (ROOT / "conf" / "scoring").glob("*.yaml"))


class OneUnitScorer(Scorer):
    """A scorer known only to this test: safety = the number of safety examples on one MLP unit of layer 0, 0
    elsewhere; utility: the default (`activation` on the utility set)."""

    def __init__(self, method: str, unit: int, tokens: str = "all", decision_tokens: int = 4):
        super().__init__(method, tokens, decision_tokens)
        self.unit = unit

    def safety(self, run: ScoringRun) -> dict[str, torch.Tensor]:
        examples = sum(int(b["input_ids"].shape[0]) for b in run.batches("safety"))
        run.metadata["one_unit"] = {"examples": examples}
        scores = {g.key: torch.zeros(g.n) for g in run.groups}
        scores["mlp.0"][self.unit] = float(examples)
        return scores


def test_a_scorer_named_only_by_its_config_runs_through_attribute(tiny, tmp_path):
    cfg = tiny_cfg(tmp_path)
    with open_dict(cfg):
        cfg.scoring = OmegaConf.create({"_target_": f"{__name__}.OneUnitScorer", "method": "one_unit", "unit": 3})
    um = attribute(tiny, cfg, device="cpu")
    assert um.metadata["one_unit"] == {"examples": 12}  # write_sets' 12 safety examples
    assert float(um.safety["mlp.0"][3]) == 12.0 and int((um.safety["mlp.0"] > 0).sum()) == 1
    assert all(float(um.utility[k].sum()) > 0 for k in um.keys)  # the default utility: activation, nonzero
    assert um.metadata["scoring"] == {"method": "one_unit", "unit": 3}  # _target_ is code, not a setting
    assert set(um.metadata["calibration"]) == {"safety", "utility"}


@pytest.mark.parametrize("option", SCORING_OPTIONS)
def test_every_scoring_option_builds_its_scorer(option):
    cfg = compose("attribute", [f"scoring={option}"])
    scorer = build_scorer(cfg.scoring)
    assert scorer.method == option and cfg.scoring._target_.startswith("safety_units.attribution.")
    assert scorer.needs_reference == isinstance(scorer, ReferenceScorer) == (option in REFERENCE_METHODS)
    assert isinstance(scorer.desc("safety"), str) and set(scorer.calibration_sets) >= {"safety", "utility"}


def test_every_scorer_run_names_a_scoring_option():
    assert {o.split("=", 1)[1] for runs in SCORER_RUNS.values() for o in runs if o.startswith("scoring=")} \
        <= set(SCORING_OPTIONS)


@pytest.mark.parametrize("override,match", [
    ("scoring._target_=safety_units.attribution.nope.Scorer", "config 'scoring' could not be instantiated.*nope"),
    ("scoring._target_=collections.OrderedDict", "must be a safety_units.attribution.scorer.Scorer subclass"),
    ("~scoring._target_", "scoring needs a _target_"),
    ("+scoring.stepz=3", "unexpected keyword argument 'stepz'"),
    ("scoring.tokens=prompt", "scoring.tokens must be one of"),
])
def test_a_bad_scoring_config_is_a_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        build_scorer(compose("attribute", ["scoring=wifv", override]).scoring)


def test_a_scorer_reads_only_the_batches_it_asks_for():
    loaded = []
    run = ScoringRun(torch.nn.Linear(1, 1), [], load=lambda which: loaded.append(which) or [{"which": which}])
    assert run.batches("utility") == [{"which": "utility"}] and run.batches("utility") is run.batches("utility")
    assert loaded == ["utility"] and run.loading_s >= 0
    with pytest.raises(ConfigError, match="no safety calibration batches"):
        ScoringRun(torch.nn.Linear(1, 1), []).batches("safety")
