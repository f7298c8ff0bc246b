"""Whether a strategy shards the weights (safety_units.models.sharded): FSDP and DeepSpeed ZeRO-3 leave no rank with
the whole model; ZeRO-1/2 shard only the optimizer state, DDP and a single device none. Read on Lightning's own
strategy classes, as the trainer configs build them (no GPU needed to construct them)."""
import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

from safety_units.models.sharded import weights_sharded


@pytest.mark.parametrize("stage,sharded", [(1, False), (2, False), (3, True)])
def test_deepspeed_shards_the_weights_at_zero_stage_3_only(stage, sharded):
    assert weights_sharded(DeepSpeedStrategy(stage=stage)) is sharded


def test_fsdp_shards_and_the_others_do_not():
    assert weights_sharded(FSDPStrategy(sharding_strategy="FULL_SHARD"))
    assert not weights_sharded(DDPStrategy()) and not weights_sharded(SingleDeviceStrategy("cpu"))
    assert not weights_sharded("auto")  # trainer=default: Lightning picks a single-process strategy

    class ModelParallelFSDPStrategy:  # a subclass or wrapper of FSDP is told by its name
        pass

    assert weights_sharded(ModelParallelFSDPStrategy())
