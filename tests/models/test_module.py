"""The LightningModule (safety_units.models.module): a non-finite loss stops the run, a bad learning rate is refused."""
import pytest
from conftest import train_cfg

from safety_units.training.fit import run_train
from safety_units.utils.errors import ConfigError, NonFiniteLossError


def test_nan_loss_stops_with_clear_message(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at global step [1-9]") as e:
        run_train(train_cfg(tmp_path, "optim.lr=1e30", "optim.warmup_ratio=0", "trainer.gradient_clip_val=null",
                            "trainer.max_steps=20"))
    assert "last good checkpoint" in str(e.value)


def test_bad_optim_value_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr must be positive"):
        run_train(train_cfg(tmp_path, "optim.lr=-1"))
