"""One voice per job under multi-process training (DDP, DeepSpeed, FSDP): logs and console tables on rank zero.

Every module logs through `RankedLogger(__name__)` (after lightning-hydra-template's RankedLogger). The rank is
Lightning's `rank_zero_only.rank`: read from RANK / LOCAL_RANK at import (processes launched by `trainer=ddp`,
torchrun or SLURM) and set by the strategy in `ddp_spawn` workers. A single process is rank zero, so single-process
output is unchanged. Files of a run are written by rank zero only: the callbacks check `trainer.is_global_zero`,
and console tables go through `rank_zero_print`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

# lightning_utilities' object is the one Lightning sets (lightning.fabric.utilities.rank_zero); importing it from
# there keeps torch-free modules (sources, judge, stats) free of torch.
from lightning_utilities.core.rank_zero import rank_zero_only

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # as Lightning reads them


def current_rank() -> int:
    """This process' global rank: Lightning's once it has set one, else the launcher's environment, else 0."""
    rank = getattr(rank_zero_only, "rank", None)
    if rank is None:
        rank = next((os.environ[k] for k in RANK_VARIABLES if os.environ.get(k) is not None), 0)
    return int(rank)


class RankedLogger(logging.LoggerAdapter):
    """A logger that logs on rank zero only, or -- `rank_zero_only=False`, for what differs between ranks -- on
    every rank with a `[rank N]` prefix where there is more than one."""

    def __init__(self, name: str = __name__, rank_zero_only: bool = True, extra: Mapping | None = None):
        super().__init__(logging.getLogger(name), extra or {})
        self.rank_zero_only = rank_zero_only

    def log(self, level: int, msg, *args, **kwargs) -> None:
        if not self.isEnabledFor(level):
            return
        rank = current_rank()
        if self.rank_zero_only and rank != 0:
            return
        msg, kwargs = self.process(msg, kwargs)
        if not self.rank_zero_only and rank != 0:
            msg = f"[rank {rank}] {msg}"
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1  # records name the caller, not this method
        self.logger.log(level, msg, *args, **kwargs)


def rank_zero_print(*args, **kwargs) -> None:
    """print() on rank zero only (tables and summaries meant for the console)."""
    if current_rank() == 0:
        print(*args, **kwargs)
