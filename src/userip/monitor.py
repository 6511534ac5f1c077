"""Wall time and peak RSS per pipeline stage (sampled in a background thread)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil


@dataclass
class StageUsage:
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def measure(interval: float = 0.1) -> Iterator[StageUsage]:
    """Yield a StageUsage that is filled in when the block ends."""
    usage = StageUsage()
    proc = psutil.Process()
    stop = threading.Event()
    peak = [proc.memory_info().rss]

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], proc.memory_info().rss)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    try:
        yield usage
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        usage.wall_s = time.perf_counter() - t0
        usage.peak_rss_mb = peak[0] / 2**20


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc ``malloc_trim``).

    Batches of varying length leave the allocator's arenas fragmented, so RSS creeps up epoch after epoch
    (3.9 -> 4.5 GB over two epochs of the default fit); trimming now and then keeps it at the working set.
    """
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
