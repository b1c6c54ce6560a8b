"""Warm sandboxes: set up ahead of demand, and what a create adds to one."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.core import engine as engine_module
from engine.core.engine import HELPER_PIDS
from engine.core.models import VolumeMount
from engine.core.warm import Shape
from engine.runtime.cgroupsv1 import CgroupV1
from engine.storage.images import shift_ownership
from tests.conftest import EngineRunner
from tests.integration.test_escapes import BUSYBOX

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


def _write_busybox_image(runner: EngineRunner, name: str, marker: str) -> None:
    """Write image ``name``: a static busybox and a /marker file with ``marker``."""
    root = runner.engine.images.images_dir / name
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "marker").write_text(marker)
    config = runner.engine.config
    shift_ownership(root, config.uid_base, config.uid_count)


def test_rebuilt_image_not_taken_warm(
    runner: EngineRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Resolve the image again on every create, as after the cache expires.
    monkeypatch.setattr(engine_module, "IMAGE_CACHE_SECONDS", 0.0)
    name = f"rebuilt-{secrets.token_hex(4)}"
    _write_busybox_image(runner, name, "first build")
    shape = Shape(name, 128, "/", False)
    ready = _warm(runner, shape)
    # A rebuild removes the image and renames a new one to the same path.
    runner.engine.images.remove(name)
    _write_busybox_image(runner, name, "second build")
    sandbox_id = runner.create(image=name, memory_mib=128, block_network=True)
    assert sandbox_id not in ready
    assert runner.run(sandbox_id, ["cat", "/marker"]).text == "second build"
