"""What a long-lived runner process needs between stages: each stage's own log file, and the heap a finished stage
held handed back to the OS."""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from pathlib import Path


def release_memory() -> None:
    """Free the stage's model copy, optimizer state and activations now, and hand the freed heap back to the OS:
    without it a process running dozens of stages grew past 12 GB on CPU (allocator fragmentation) and was killed."""
    import ctypes

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


@contextmanager
def stage_log(path: Path):
    """Log records of the stage also go to <study>/<stage>.log."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
