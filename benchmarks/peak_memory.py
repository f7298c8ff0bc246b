"""Time a call and the peak extra resident memory it needs (shared by the benchmarks' worker processes).

RSS is sampled every 2 ms from just before the call (model and inputs loaded) to its return; run the worker with
MALLOC_MMAP_THRESHOLD_=131072 so glibc hands large freed blocks back at once and RSS follows the live tensors."""

from __future__ import annotations

import threading
import time


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
