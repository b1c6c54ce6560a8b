"""WarmPool's bookkeeping, with plain objects standing in for sandboxes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from engine.core import warm
from engine.core.models import SandboxSpec, VolumeMount
from engine.core.warm import Shape, WarmPool
from engine.errors import Unavailable

SHAPE = Shape("host", 512, "/", False)
OTHER = Shape("debian", 512, "/", True)


@dataclass(eq=False)
class Item:
    shape: Shape
    number: int
    alive: bool = True


@dataclass
class Harness:
    prepared: list[Item] = field(default_factory=list)
    discarded: list[Item] = field(default_factory=list)
    fail: bool = False

    async def prepare(self, shape: Shape) -> Item:
        await asyncio.sleep(0)
        if self.fail:
            raise Unavailable("setup failed")
        item = Item(shape, len(self.prepared))
        self.prepared.append(item)
        return item

    async def discard(self, item: Item) -> None:
        self.discarded.append(item)

    def pool(self, size: int = 2) -> WarmPool[Item]:
        return WarmPool(self.prepare, self.discard, lambda item: item.alive, size)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


@pytest.fixture(autouse=True)
def no_refill_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm, "REFILL_DELAY", 0.0)


async def settle(pool: WarmPool[Item]) -> None:
    for _ in range(100):
        if not pool.refilling():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the pool kept refilling")


def test_shape_of_plain_spec() -> None:
    shape = Shape.of(SandboxSpec(image="host", memory_mib=256, workdir="/root"))
    assert shape == Shape("host", 256, "/root", True)


def test_shape_none_with_volumes() -> None:
    spec = SandboxSpec(volumes=(VolumeMount("cache", "/data"),))
    assert Shape.of(spec) is None


def test_shape_spec_round_trip() -> None:
    assert Shape.of(OTHER.spec()) == OTHER


def test_take_unknown_shape_returns_none() -> None:
    async def test() -> None:
        harness = Harness()
        pool = harness.pool()
        assert await pool.take(SHAPE) is None
        await settle(pool)
        assert harness.prepared == []

    run(test)


def test_want_fills_to_size() -> None:
    async def test() -> None:
        harness = Harness()
        pool = harness.pool(size=3)
        pool.want(SHAPE)
        await settle(pool)
        assert len(harness.prepared) == 3
        assert len(pool) == 3
        await pool.close()

    run(test)


def test_take_hands_each_item_once() -> None:
    async def test() -> None:
        harness = Harness()
        pool = harness.pool(size=2)
        pool.want(SHAPE)
        await settle(pool)
        first = await pool.take(SHAPE)
        second = await pool.take(SHAPE)
        assert first is not None
        assert second is not None
        assert first is not second
        await settle(pool)
        third = await pool.take(SHAPE)
        assert third not in (first, second)
        await pool.close()

    run(test)


def test_dead_item_discarded_not_taken() -> None:
    async def test() -> None:
        harness = Harness()
        pool = harness.pool(size=2)
        pool.want(SHAPE)
        await settle(pool)
        dead, alive = pool.items()
        dead.alive = False
        taken = await pool.take(SHAPE)
        await asyncio.sleep(0)
        assert taken is alive
        assert harness.discarded == [dead]
        await pool.close()

    run(test)


def test_evict_discards_item() -> None:
    async def test() -> None:
        harness = Harness()
        pool = harness.pool(size=1)
        pool.want(SHAPE)
        await settle(pool)
        (item,) = pool.items()
        pool.evict(item)
        await asyncio.sleep(0)
        assert harness.discarded == [item]
        assert pool.items() == []
        await pool.close()

    run(test)


def test_third_shape_drops_oldest() -> None:
    async def test() -> None:
        harness = Harness()
        pool = harness.pool(size=1)
        third = Shape("host", 1024, "/", False)
        for shape in (SHAPE, OTHER, third):
            pool.want(shape)
            await settle(pool)
        await asyncio.sleep(0)
        assert {item.shape for item in pool.items()} == {OTHER, third}
        assert [item.shape for item in harness.discarded] == [SHAPE]
        assert await pool.take(SHAPE) is None
        await pool.close()

    run(test)


def test_failed_setup_stops_refill() -> None:
    async def test() -> None:
        harness = Harness(fail=True)
        pool = harness.pool(size=2)
        pool.want(SHAPE)
        await settle(pool)
        assert pool.items() == []
        assert harness.prepared == []
        await pool.close()

    run(test)


def test_refill_waits_for_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm, "REFILL_DELAY", 0.2)

    async def test() -> None:
        harness = Harness()
        pool = harness.pool(size=1)
        pool.want(SHAPE)
        await asyncio.sleep(0.05)
        assert harness.prepared == []
        assert pool.refilling()
        await asyncio.sleep(0.3)
        assert len(harness.prepared) == 1
        await pool.close()

    run(test)


def test_close_discards_everything() -> None:
    async def test() -> None:
        harness = Harness()
        pool = harness.pool(size=2)
        pool.want(SHAPE)
        await settle(pool)
        items = pool.items()
        await pool.close()
        assert sorted(item.number for item in harness.discarded) == sorted(
            item.number for item in items
        )
        assert pool.items() == []
        pool.want(SHAPE)
        assert await pool.take(SHAPE) is None

    run(test)


def test_size_zero_keeps_nothing() -> None:
    async def test() -> None:
        harness = Harness()
        pool = harness.pool(size=0)
        pool.want(SHAPE)
        await settle(pool)
        assert harness.prepared == []
        assert await pool.take(SHAPE) is None

    run(test)
