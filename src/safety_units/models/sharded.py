"""Sharded weights: whether a strategy leaves no rank with the whole model (FSDP, ZeRO-3), so per-rank weight reads
and tensor hooks do not see full tensors."""

from __future__ import annotations


def weights_sharded(strategy) -> bool:
    """True where no rank holds the whole model (FSDP, DeepSpeed ZeRO-3); ZeRO-1/2 shard only optimizer state."""
    name = type(strategy).__name__
    return "FSDP" in name or (name == "DeepSpeedStrategy" and bool(getattr(strategy, "zero_stage_3", False)))
