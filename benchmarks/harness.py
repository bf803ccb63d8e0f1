"""A small, careful timing harness: warm-up, calibration, interleaved repeats, median and spread.

Cases that are compared with each other are measured in one group, and the group's repeats
are interleaved (case A, B, C, then A, B, C again ...), so a burst of load from elsewhere on
a shared machine slows every case of a round alike instead of one case only. Each repeat
runs the case's loop ``n`` times (``n`` calibrated once per case so a repeat lasts about
``target`` seconds) and the result is the median time per operation over the repeats, with
the spread ``(max - min) / median`` of those repeats.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["AsyncCase", "Measured", "SyncCase", "run_async_group", "run_sync_group"]

#: A sync case: ``loop(n)`` performs the operation n times.
SyncLoop = Callable[[int], None]
#: An async case: ``await loop(n)`` performs the operation n times.
AsyncLoop = Callable[[int], Awaitable[None]]


@dataclass
class SyncCase:
    """One thing to time: ``loop(n)`` runs the operation ``n`` times."""

    name: str
    loop: SyncLoop
    n: int | None = None  # fixed iteration count (cases that consume prepared inputs)


@dataclass
class AsyncCase:
    """One async thing to time: ``await loop(n)`` runs the operation ``n`` times."""

    name: str
    loop: AsyncLoop
    n: int | None = None


@dataclass
class Measured:
    """Per-operation times of one case, in nanoseconds."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """``(max - min) / median`` over the repeats."""
        return (max(self.samples) - min(self.samples)) / self.median if self.samples else 0.0


def _calibrate_sync(loop: SyncLoop, target: float) -> int:
    n = 1
    while True:
        start = time.perf_counter()
        loop(n)
        elapsed = time.perf_counter() - start
        if elapsed >= target / 10 or n >= 1 << 24:
            return max(1, int(n * target / max(elapsed, 1e-9)))
        n *= 4


async def _calibrate_async(loop: AsyncLoop, target: float) -> int:
    n = 1
    while True:
        start = time.perf_counter()
        await loop(n)
        elapsed = time.perf_counter() - start
        if elapsed >= target / 10 or n >= 1 << 24:
            return max(1, int(n * target / max(elapsed, 1e-9)))
        n *= 4


def run_sync_group(
    cases: list[SyncCase], *, repeats: int = 7, target: float = 0.05
) -> dict[str, Measured]:
    """Time every case, interleaving the repeats; returns ``{name: Measured}``."""
    counts = {}
    for case in cases:
        if case.n is None:
            case.loop(100)  # warm-up: imports, caches, first allocations
            counts[case.name] = _calibrate_sync(case.loop, target)
        else:
            case.loop(case.n)
            counts[case.name] = case.n
    results = {case.name: Measured(case.name) for case in cases}
    for _ in range(repeats):
        for case in cases:
            n = counts[case.name]
            gc.collect()
            start = time.perf_counter_ns()
            case.loop(n)
            results[case.name].samples.append((time.perf_counter_ns() - start) / n)
    return results


def run_async_group(
    cases: list[AsyncCase], *, repeats: int = 7, target: float = 0.05
) -> dict[str, Measured]:
    """Time every async case on one event loop, interleaving the repeats."""

    async def main() -> dict[str, Measured]:
        counts = {}
        for case in cases:
            if case.n is None:
                await case.loop(100)
                counts[case.name] = await _calibrate_async(case.loop, target)
            else:
                await case.loop(case.n)
                counts[case.name] = case.n
        results = {case.name: Measured(case.name) for case in cases}
        for _ in range(repeats):
            for case in cases:
                n = counts[case.name]
                gc.collect()
                start = time.perf_counter_ns()
                await case.loop(n)
                results[case.name].samples.append((time.perf_counter_ns() - start) / n)
        return results

    return asyncio.run(main())
