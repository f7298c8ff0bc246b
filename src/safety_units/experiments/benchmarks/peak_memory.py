"""Time a call and the peak extra resident memory it needs, in a fresh process of its own.

`timed_peak(fn)` samples RSS every 2 ms from just before the call (model and inputs loaded) to its return.
`in_fresh_process(fn, **kwargs)` runs fn in a new Python process, with MALLOC_MMAP_THRESHOLD_=131072 so that glibc
hands large freed blocks back at once and RSS follows the live tensors rather than the allocator's high-water mark
(and so that one measurement's allocations do not carry over to the next)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from safety_units.utils.errors import SafetyUnitsError

# the child: import the module, call the function with the JSON keyword arguments, print its JSON result last
CHILD = ("import importlib, json, sys\n"
         "fn = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])\n"
         "print(json.dumps(fn(**json.loads(sys.argv[3]))))\n")


class WorkerFailed(SafetyUnitsError):
    """A measurement's worker process exited with an error."""


def timed_peak(fn) -> tuple[float, float]:
    """(seconds, peak extra MB) of fn()."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        th.join()
    return seconds, (peak[0] - base) / 2**20


def in_fresh_process(fn, env: dict[str, str] | None = None, **kwargs) -> dict:
    """fn(**kwargs) (a module-level function returning JSON-able data) in a new Python process; `env` adds to the
    environment. A failure prints the worker's error output and raises WorkerFailed."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", **(env or {}))
    res = subprocess.run([sys.executable, "-c", CHILD, fn.__module__, fn.__name__, json.dumps(kwargs)],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr, flush=True)
        raise WorkerFailed(f"{fn.__name__}({kwargs}) failed in its worker process (its error output is above).")
    return json.loads(res.stdout.strip().splitlines()[-1])


def allocation_probe(mb: int = 64, hold_s: float = 0.2) -> dict:
    """timed_peak of a float32 tensor of `mb` MB kept alive `hold_s` seconds: the meter's own check, meaningful in a
    fresh process (in_fresh_process), where freed memory goes back to the system instead of being reused."""
    import torch

    def hold():
        x = torch.ones(mb, 2**20 // 4)
        time.sleep(hold_s)
        return float(x[0, 0])

    seconds, peak_mb = timed_peak(hold)
    return {"seconds": seconds, "peak_mb": peak_mb}
