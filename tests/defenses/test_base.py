"""The defense interface (safety_units.defenses.base): every conf/defense/*.yaml builds the class its _target_ names,
a defense defined outside the package only by a _target_ config runs through fit, and a bad _target_ is a clear
error."""

import lightning.pytorch as pl
import pytest
from conftest import ROOT, compose, train_cfg
from hydra.utils import get_class

from safety_units.defenses.base import Defense, build_defense
from safety_units.utils.errors import ConfigError


class CountingDefense(Defense):
    """A defense from outside the package: its loss is the plain loss times `scale`, counted; a callback sees the
    end of training; the summary reports both."""

    def __init__(self, name: str, stage: str, scale: float = 1.0):
        super().__init__(name, stage)
        self.scale, self.loss_calls, self.ended = scale, 0, False

    def training_objective(self, tokenizer, data, seed):
        return self

    def loss(self, module, batch):
        self.loss_calls += 1
        return self.scale * module.model(**batch).loss

    def callbacks(self, tokenizer):
        defense = self

        class SeeTheEnd(pl.Callback):
            def on_train_end(self, trainer, pl_module):
                defense.ended = True

        return [SeeTheEnd()]

    def summary(self):
        return {**super().summary(), "scale": self.scale, "loss_calls": self.loss_calls, "ended": self.ended}


def test_every_defense_config_builds_the_class_its_target_names():
    for path in sorted((ROOT / "conf" / "defense").glob("*.yaml")):
        cfg = compose("train", ["~experiment", f"defense={path.stem}"]).defense
        defense = build_defense(cfg)
        assert type(defense) is get_class(cfg._target_), path.name
        assert (defense.name, defense.stage) == (path.stem, cfg.stage), path.name
    assert build_defense(None).summary() is None  # no defense config: the no-op base, nothing recorded


def test_a_defense_defined_only_by_its_target_runs_through_fit(tmp_path):
    from safety_units.training.fit import run_train

    cfg = train_cfg(tmp_path, f"defense._target_={__name__}.CountingDefense", "defense.name=counting",
                    "defense.stage=finetune", "+defense.scale=2.0", "trainer.max_steps=2", "export=false",
                    "data.val_fraction=0", "data.num_samples=8", "data.max_length=32")
    summary = run_train(cfg)
    assert summary["global_step"] == 2
    assert summary["defense"] == {"name": "counting", "stage": "finetune", "scale": 2.0, "loss_calls": 2,
                                  "ended": True}


def test_a_bad_target_is_a_clear_error():
    with pytest.raises(ConfigError, match="config 'defense' could not be instantiated.*safety_units.defenses.nope"):
        build_defense({"_target_": "safety_units.defenses.nope.Nope", "name": "nope", "stage": "finetune"})
    with pytest.raises(ConfigError, match="defense._target_ 'pathlib.Path' built a .*Path, not a"):
        build_defense({"_target_": "pathlib.Path"})
    with pytest.raises(ConfigError, match=r"defense \(name: 'old'\) has no _target_"):
        build_defense({"name": "old", "stage": "finetune"})
    with pytest.raises(ConfigError, match="unexpected keyword argument 'rhoo'"):
        build_defense({**compose("train", ["defense=vaccine"]).defense, "rhoo": 1.0})
    with pytest.raises(ConfigError, match="defense.stage must be one of"):
        build_defense({"_target_": "safety_units.defenses.base.Defense", "stage": "later"})
