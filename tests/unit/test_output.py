"""OutputBuffer and OutputBudget: bounded memory whatever the write pattern."""

from __future__ import annotations

import asyncio

from engine.core.models import Stream
from engine.core.output import MAX_CHUNK_BYTES, OutputBudget, OutputBuffer, OutputRate


def test_tiny_writes_gather_into_chunks() -> None:
    buffer = OutputBuffer(Stream.STDOUT, capacity=1 << 20)
    for _ in range(300_000):
        buffer.append(b"x")
    assert buffer.held == 300_000
    assert len(buffer._chunks) == 300_000 // MAX_CHUNK_BYTES
    assert buffer.read(0, 1 << 20).data == b"x" * 300_000


def test_capacity_drops_oldest_bytes() -> None:
    buffer = OutputBuffer(Stream.STDOUT, capacity=100)
    for index in range(10):
        buffer.append(bytes([index]) * 30)
    chunk = buffer.read(0)
    assert buffer.held == 100
    assert chunk.dropped == 200
    assert chunk.offset == 200
    assert chunk.data[:10] == bytes([6]) * 10
    assert chunk.data[-30:] == bytes([9]) * 30


def test_budget_drops_ended_streams_first() -> None:
    budget = OutputBudget(limit=1000)
    ended = OutputBuffer(Stream.STDOUT, capacity=1000, budget=budget)
    running = OutputBuffer(Stream.STDOUT, capacity=1000, budget=budget)
    ended.append(b"a" * 800)
    ended.close()
    running.append(b"b" * 700)
    assert budget.used == 1000
    assert running.held == 700
    assert ended.held == 300
    assert ended.read(0).dropped == 500


def test_budget_trims_open_streams_last() -> None:
    budget = OutputBudget(limit=1000)
    first = OutputBuffer(Stream.STDOUT, capacity=1000, budget=budget)
    second = OutputBuffer(Stream.STDERR, capacity=1000, budget=budget)
    first.append(b"a" * 900)
    second.append(b"b" * 900)
    assert budget.used == 1000
    assert first.held == 100
    assert second.held == 900


def test_budget_release_empties_every_buffer() -> None:
    budget = OutputBudget(limit=1000)
    buffer = OutputBuffer(Stream.STDOUT, capacity=1000, budget=budget)
    buffer.append(b"z" * 500)
    buffer.close()
    budget.release()
    chunk = buffer.read(0)
    assert budget.used == 0
    assert chunk.data == b""
    assert chunk.dropped == 500
    assert chunk.eof


def test_follow_ends_after_release() -> None:
    async def scenario() -> list[bytes]:
        budget = OutputBudget(limit=1000)
        buffer = OutputBuffer(Stream.STDOUT, capacity=1000, budget=budget)
        buffer.append(b"q" * 10)
        buffer.close()
        budget.release()
        return [chunk.data async for chunk in buffer.follow(0)]

    assert asyncio.run(scenario()) == [b""]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_allows_burst_at_once() -> None:
    rate = OutputRate(rate=1000, burst=500, clock=FakeClock())
    assert rate.take(300) == 0.0
    assert rate.take(200) == 0.0


def test_rate_delays_past_burst() -> None:
    rate = OutputRate(rate=1000, burst=500, clock=FakeClock())
    assert rate.take(500) == 0.0
    assert rate.take(250) == 0.25


def test_rate_refills_with_time() -> None:
    clock = FakeClock()
    rate = OutputRate(rate=1000, burst=500, clock=clock)
    rate.take(750)
    clock.now += 0.75
    assert rate.take(500) == 0.0


def test_rate_refill_capped_at_burst() -> None:
    clock = FakeClock()
    rate = OutputRate(rate=1000, burst=500, clock=clock)
    clock.now += 60
    assert rate.take(600) == 0.1


def test_lifted_rate_never_delays() -> None:
    rate = OutputRate(rate=1000, burst=500, clock=FakeClock())
    rate.take(5000)
    rate.lift()
    assert rate.take(10_000) == 0.0
