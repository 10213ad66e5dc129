"""Shared helpers: best-of-N timing and peak RSS, so every ratio uses the same method."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable


def best_of(
    fn: Callable[[], object], repeat: int = 7, setup: Callable[[], object] | None = None
) -> float:
    """Fastest wall time of `repeat` calls (the least noisy estimate on a shared machine);
    `setup` runs before each call, untimed."""
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def report(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
