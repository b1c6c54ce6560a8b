"""Benchmark cases and the round-robin loop that samples them.

Every iteration runs each available case once, in a new random order. The
interleaving makes noise from other work on the machine fall on all systems
alike, not on whichever ran during a noisy minute. The shuffle keeps any case
from always running right after the same other case and inheriting its
background work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

COLD_START = "cold_start"
EXEC = "exec"
EXEC_BURST = "exec_burst"
THROUGHPUT = "throughput"
# Unit of Case.samples: seconds for latencies, sandboxes per second for throughput.
SECONDS = "seconds"
PER_SECOND = "per_second"


@dataclass
class Sample:
    """One measured value, with per-operation details for the raw results."""

    value: float
    details: dict[str, list[float]] = field(default_factory=dict)


def throughput_system(clients: int, *, sustained: bool = False) -> str:
    """Return the system key of the throughput case with ``clients`` clients."""
    return f"engine-sdk-{clients}-clients" + ("-sustained" if sustained else "")


@dataclass
class Case:
    """One row of a table: a system measured one way.

    ``run`` returns one sample. ``unavailable`` is the reason the case cannot
    run at all, and ``error`` the reason it stopped part way through.
    """

    measurement: str
    system: str
    label: str
    unit: str
    run: Callable[[], Awaitable[float | Sample]] | None
    unavailable: str = ""
    samples: list[float] = field(default_factory=list)
    details: dict[str, list[float]] = field(default_factory=dict)
    error: str = ""

    @property
    def runnable(self) -> bool:
        return self.run is not None and not self.unavailable and not self.error


def threaded(function: Callable[..., Any], *arguments: Any) -> Callable[[], Any]:
    """Wrap a blocking timed call so that it runs in a worker thread.

    The event loop stays free meanwhile, so the embedded engine finishes its
    background work (cgroup pool refills, cleanup) while other systems run,
    as the daemon does in its own process. When the run is cancelled, the
    call still finishes before the cancellation goes on, so that cleanup
    never races with a sample in flight.
    """

    async def run() -> Any:
        future = asyncio.ensure_future(asyncio.to_thread(function, *arguments))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await future
            raise

    return run


def back_to_back(function: Callable[[], float], count: int) -> Callable[[], Sample]:
    """Wrap a timed call so that one sample is the mean of ``count`` calls in a row."""

    def run() -> Sample:
        values = [function() for _ in range(count)]
        return Sample(sum(values) / count, {"each_seconds": values})

    return run


def back_to_back_async(
    function: Callable[[], Awaitable[float]], count: int
) -> Callable[[], Awaitable[Sample]]:
    """Like ``back_to_back``, for a coroutine function."""

    async def run() -> Sample:
        values = [await function() for _ in range(count)]
        return Sample(sum(values) / count, {"each_seconds": values})

    return run


def _record(case: Case, result: float | Sample) -> None:
    if isinstance(result, Sample):
        case.samples.append(result.value)
        for key, values in result.details.items():
            case.details.setdefault(key, []).extend(values)
    else:
        case.samples.append(result)


async def run_round_robin(
    cases: list[Case], *, iterations: int, warmup: int, pause: float, seed: int
) -> None:
    """Sample every runnable case ``warmup + iterations`` times, interleaved.

    Each round runs every case once, in an order shuffled with a generator
    seeded by ``seed``. Warm-up samples are discarded. A case whose run raises
    is marked with the error and skipped from then on. ``pause`` is seconds of
    sleep after each sample, which lets the background work of the previous
    sample finish.
    """
    active = [case for case in cases if case.runnable]
    if not active:
        return
    shuffler = random.Random(seed)
    started = time.monotonic()
    for iteration in range(warmup + iterations):
        order = list(active)
        shuffler.shuffle(order)
        for case in order:
            if not case.runnable:
                continue
            assert case.run is not None
            try:
                result = await case.run()
            except Exception as error:
                case.error = f"failed at iteration {iteration + 1}: {error}"
                logger.error("%s, %s: %s", case.measurement, case.label, case.error)
                continue
            if iteration >= warmup:
                _record(case, result)
            if pause > 0:
                await asyncio.sleep(pause)
        phase = "warm-up" if iteration < warmup else "iteration"
        number = iteration + 1 if iteration < warmup else iteration + 1 - warmup
        logger.info(
            "%s %d done, %.1f s elapsed", phase, number, time.monotonic() - started
        )
