"""Warm sandboxes: set up ahead of demand, and what a create adds to one."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.core.engine import HELPER_PIDS
from engine.core.models import VolumeMount
from engine.core.warm import Shape
from engine.runtime.cgroupsv1 import CgroupV1
from tests.conftest import EngineRunner

MIB = 1024 * 1024


def _warm(runner: EngineRunner, shape: Shape, count: int = 1) -> list[str]:
    """Make ``shape`` warm and return the ids of its ready sandboxes."""
    assert runner.engine.warm is not None
    spec = shape.spec()
    first = runner.create(
        image=spec.image,
        memory_mib=spec.memory_mib,
        workdir=spec.workdir,
        block_network=spec.block_network,
    )
    runner.terminate(first)

    def ready() -> bool:
        return len(_warm_ids(runner, shape)) >= count

    runner.wait_until(ready, f"{count} warm sandboxes of {shape}", timeout=30)
    return _warm_ids(runner, shape)


def _warm_ids(runner: EngineRunner, shape: Shape) -> list[str]:
    return [
        sandbox.info.sandbox_id
        for sandbox in runner.warm_sandboxes()
        if Shape.of(sandbox.info.spec) == shape
    ]


def _cpu_dir(runner: EngineRunner, sandbox_id: str) -> str:
    group = runner.engine.sandboxes[sandbox_id].cgroup
    assert isinstance(group, CgroupV1)
    return group.dirs["cpu"]


def _read(directory: str, name: str) -> str:
    return Path(directory, name).read_text().strip()


@pytest.fixture
def runner(engine_factory: Callable[..., EngineRunner]) -> EngineRunner:
    return engine_factory()


def test_create_takes_warm_sandbox(runner: EngineRunner) -> None:
    shape = Shape("host", 256, "/", False)
    ready = _warm(runner, shape)
    sandbox_id = runner.create(memory_mib=256, block_network=True)
    assert sandbox_id in ready
    assert sandbox_id not in _warm_ids(runner, shape)
    hostname = runner.run(sandbox_id, ["cat", "/etc/hostname"])
    assert hostname.text == f"{sandbox_id}\n"
    assert runner.run(sandbox_id, ["hostname"]).text == f"{sandbox_id}\n"


def test_warm_cgroup_weight_low_until_taken(runner: EngineRunner) -> None:
    shape = Shape("host", 256, "/", False)
    ready = _warm(runner, shape)
    warm = next(s for s in runner.warm_sandboxes() if s.info.sandbox_id in ready)
    assert isinstance(warm.cgroup, CgroupV1)
    assert _read(warm.cgroup.dirs["cpu"], "cpu.shares") == "10"
    sandbox_id = runner.create(memory_mib=256, block_network=True, cpu=0.5, pids=40)
    assert sandbox_id == warm.info.sandbox_id
    cpu = _cpu_dir(runner, sandbox_id)
    assert _read(cpu, "cpu.shares") == "1024"
    assert _read(cpu, "cpu.cfs_quota_us") == "50000"
    group = runner.engine.sandboxes[sandbox_id].cgroup
    assert isinstance(group, CgroupV1)
    assert _read(group.dirs["memory"], "memory.limit_in_bytes") == str(256 * MIB)
    assert _read(group.dirs["pids"], "pids.max") == str(40 + HELPER_PIDS)


def test_warm_sandbox_gets_request_disk(runner: EngineRunner) -> None:
    shape = Shape("host", 256, "/", False)
    ready = _warm(runner, shape)
    sandbox_id = runner.create(memory_mib=256, block_network=True, disk_mib=32)
    assert sandbox_id in ready
    filled = runner.run(
        sandbox_id,
        ["sh", "-c", "dd if=/dev/zero of=/root/fill bs=1M count=64 2>&1; sync"],
    )
    assert "Disk quota exceeded" in filled.text


def test_warm_sandbox_gets_request_policy(runner: EngineRunner) -> None:
    shape = Shape("host", 256, "/", True)
    ready = _warm(runner, shape)
    sandbox_id = runner.create(memory_mib=256, allow_list=("198.51.100.0/24",))
    assert sandbox_id in ready
    assert runner.engine.network is not None
    ruleset = runner.engine.network.ruleset()
    chain = ruleset[ruleset.index(f"chain {sandbox_id}") :]
    chain = chain[: chain.index("}")]
    assert "198.51.100.0/24" in chain
    assert "reject" in chain


def test_dead_warm_sandbox_discarded(runner: EngineRunner) -> None:
    shape = Shape("host", 256, "/", False)
    ready = _warm(runner, shape, count=2)
    victim = next(s for s in runner.warm_sandboxes() if s.info.sandbox_id == ready[0])
    assert victim.init is not None
    os.kill(victim.init.pid, signal.SIGKILL)
    layers = runner.engine.config.sandboxes_dir

    def discarded() -> bool:
        return (
            ready[0] not in _warm_ids(runner, shape)
            and not (layers / ready[0]).exists()
        )

    runner.wait_until(discarded, "the dead warm sandbox to be discarded", timeout=10)
    sandbox_id = runner.create(memory_mib=256, block_network=True)
    assert sandbox_id != ready[0]
    assert runner.run(sandbox_id, ["true"]).exit_code == 0


def test_volume_spec_never_warm(runner: EngineRunner) -> None:
    runner.call(runner.engine.create_volume("warm-data"))
    mount = (VolumeMount("warm-data", "/data"),)
    first = runner.create(volumes=mount)
    runner.terminate(first)
    runner.settle_pool()
    assert all(sandbox.info.spec.volumes == () for sandbox in runner.warm_sandboxes())
    second = runner.create(volumes=mount)
    assert runner.run(second, ["ls", "/data"]).exit_code == 0
