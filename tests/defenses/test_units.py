"""The unit-level defenses (safety_units.defenses.units): defense=esu | esu_cu | random | layers | sn_tune select
their freeze= strategy, and a freeze= override that contradicts it is an error."""

import pytest
from conftest import compose, train_cfg

from safety_units.defenses.base import build_defense
from safety_units.defenses.units import UnitFreeze
from safety_units.utils.errors import ConfigError


def test_defense_configs_select_their_freeze_and_refuse_a_contradiction(tmp_path):
    from safety_units.training.fit import run_train

    for d, strategy in {"esu": "esu", "esu_cu": "esu_cu", "random": "random", "layers": "layers",
                        "sn_tune": "train_only"}.items():
        cfg = compose("train", ["~experiment", f"defense={d}"])
        assert cfg.freeze.strategy == strategy, d
        defense = build_defense(cfg.defense)
        assert isinstance(defense, UnitFreeze) and defense.freeze_strategy == strategy, d
        defense.check_run(cfg)  # the strategy it selected: no error
    assert cfg.freeze.classes == ["esu"]  # sn_tune trains only the ESU
    with pytest.raises(ConfigError, match="defense=esu_cu freezes with freeze=esu_cu"):
        run_train(train_cfg(tmp_path, "defense=esu_cu", "freeze=none"))
