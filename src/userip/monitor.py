"""Memory and time: the process's RSS now and at its peak, and wall time and peak RSS per pipeline stage.

The one place userip measures memory (in MiB): the profile fit's per-epoch RSS and final peak, the stage table
of `userip run` and the benchmarks' peaks all come from here.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil


def rss_mb() -> float:
    """This process's resident set size now (MiB)."""
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set size since it started (MiB; the kernel's high-water mark, so it misses
    no short spike, but it never goes down: a stage's own peak is `measure`'s job)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@dataclass
class StageUsage:
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def measure(interval: float = 0.1) -> Iterator[StageUsage]:
    """Yield a StageUsage that is filled in when the block ends: the block's wall time and the largest RSS
    sampled every ``interval`` seconds while it ran."""
    usage = StageUsage()
    stop = threading.Event()
    peak = [rss_mb()]

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], rss_mb())

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    try:
        yield usage
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], rss_mb())
        usage.wall_s = time.perf_counter() - t0
        usage.peak_rss_mb = peak[0]


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc ``malloc_trim``).

    Batches of varying length leave the allocator's arenas fragmented, so RSS creeps up epoch after epoch
    (3.9 -> 4.5 GB over two epochs of the default fit); trimming now and then keeps it at the working set.
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
