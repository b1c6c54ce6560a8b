"""The disk limit of each sandbox's writable layer, on the real kernel.

The layers live on the engine's btrfs file system on a loop device, one
subvolume with a quota group limit per sandbox (engine/storage/layers.py).
Writes inside the sandbox go through overlayfs to that subvolume.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psutil
import pytest

from engine import Sandbox, SandboxInstance, errors
from engine.core.models import DEFAULT_DISK_MIB
from engine.runtime import loop
from engine.sdk.aio import AsyncSandbox
from engine.sdk.embedded import EmbeddedEngine
from engine.storage.layers import IMAGE_NAME, is_mount_point
from engine.v1 import sandbox_pb2 as pb
from engine.v1 import sandbox_pb2_grpc

if TYPE_CHECKING:
    from conftest import EngineRunner

    from tests.integration.conftest import CliRunner, Daemon

MIB = 1024 * 1024
# Bytes of the layer that the sandbox's own directories and generated /etc
# files take before any write, and the quota's rounding: a fill stops this
# close to the limit or closer.
LAYER_SLACK = 4 * MIB

# Writes 1 MiB chunks to argv[1] until the open or a write fails, then prints
# the bytes written and the errno as JSON.
FILL = """
import json, os, sys
chunk = b"x" * (1 << 20)
written = 0
code = 0
try:
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            view = memoryview(chunk)
            while view:
                count = os.write(fd, view)
                written += count
                view = view[count:]
    finally:
        os.close(fd)
except OSError as error:
    code = error.errno
print(json.dumps({"written": written, "errno": code}))
"""

# Creates empty files in argv[1] until a create fails, then prints the count
# and the errno as JSON.
FILL_INODES = """
import json, os, sys
count = 0
code = 0
try:
    while count < 2_000_000:
        os.close(os.open(f"{sys.argv[1]}/{count}", os.O_WRONLY | os.O_CREAT, 0o644))
        count += 1
except OSError as error:
    code = error.errno
print(json.dumps({"count": count, "errno": code}))
"""

# Tries every way sandbox code might use to leave its quota, and prints the
# errno of each attempt as JSON (0 means the call succeeded).
ESCAPE = """
import ctypes, fcntl, json, os, struct

def attempt(call):
    try:
        call()
    except OSError as error:
        return error.errno
    return 0

os.mkdir("/root/target")
fd = os.open("/root/target", os.O_RDONLY | os.O_DIRECTORY)
results = {}

# FS_IOC_FSSETXATTR with a new project id and FS_XFLAG_PROJINHERIT.
fsxattr = struct.pack("IIII I8x", 0x200, 0, 0, 12345, 0)
results["fssetxattr_projid"] = attempt(
    lambda: fcntl.ioctl(fd, 0x401C5820, fsxattr)
)
# BTRFS_IOC_SUBVOL_CREATE: a new subvolume would have no quota limit.
# fcntl.ioctl copies at most 1024 bytes of an immutable argument, so the
# 4096-byte argument structures are passed as a bytearray.
vol_args = bytearray(struct.pack("q4088s", 0, b"escape"))
results["btrfs_subvol_create"] = attempt(
    lambda: fcntl.ioctl(fd, 0x5000940E, vol_args)
)
# BTRFS_IOC_QGROUP_LIMIT of subvolume 256 to no limit.
limit_args = struct.pack("QQQQQQ", 256, 1, 0, 0, 0, 0)
results["btrfs_qgroup_limit"] = attempt(
    lambda: fcntl.ioctl(fd, 0x8030942B, limit_args)
)
# BTRFS_IOC_QUOTA_CTL with BTRFS_QUOTA_CTL_DISABLE.
results["btrfs_quota_disable"] = attempt(
    lambda: fcntl.ioctl(fd, 0xC0109428, struct.pack("QQ", 2, 0))
)
# quotactl(QCMD(Q_QUOTAOFF, PRJQUOTA), "/", 0, NULL).
libc = ctypes.CDLL(None, use_errno=True)
result = libc.quotactl(ctypes.c_int((0x800003 << 8) | 2), b"/", 0, None)
results["quotactl"] = ctypes.get_errno() if result != 0 else 0
print(json.dumps(results))
"""


def run_python(sandbox: SandboxInstance, script: str, *args: str) -> dict[str, Any]:
    process = sandbox.process.exec("/usr/bin/python3", "-c", script, *args)
    code = process.wait()
    stderr = process.stderr.read()
    assert code == 0, stderr
    return json.loads(process.stdout.read())


# ------------------------------------------------------------------ the limit


def test_fill_stops_at_limit(address: str) -> None:
    with Sandbox(disk=64, address=address).create() as sandbox:
        result = run_python(sandbox, FILL, "/root/fill")

        assert result["errno"] == errno.EDQUOT
        assert result["written"] <= 64 * MIB
        assert result["written"] >= 64 * MIB - LAYER_SLACK


def test_remove_frees_quota(address: str) -> None:
    with Sandbox(disk=48, address=address).create() as sandbox:
        first = run_python(sandbox, FILL, "/root/fill")
        removed = sandbox.process.exec("rm", "/root/fill")
        assert removed.wait() == 0

        second = run_python(sandbox, FILL, "/root/again")

        assert first["errno"] == errno.EDQUOT
        assert second["errno"] == errno.EDQUOT
        assert second["written"] >= first["written"] - MIB


def test_limits_are_separate(address: str) -> None:
    with (
        Sandbox(disk=32, address=address).create() as small,
        Sandbox(disk=96, address=address).create() as large,
    ):
        full = run_python(small, FILL, "/root/fill")
        other = run_python(large, FILL, "/root/fill")

        assert full["errno"] == errno.EDQUOT
        assert full["written"] <= 32 * MIB
        assert other["errno"] == errno.EDQUOT
        assert other["written"] >= 96 * MIB - LAYER_SLACK
        # The full sandbox still runs commands that write nothing.
        process = small.process.exec("echo", "alive")
        assert process.wait() == 0
        assert process.stdout.read() == "alive\n"


def test_inodes_are_bounded(address: str) -> None:
    with Sandbox(disk=16, address=address).create() as sandbox:
        sandbox.fs.create_directory("/root/many")
        result = run_python(sandbox, FILL_INODES, "/root/many")
        after = run_python(sandbox, FILL, "/root/fill")

        assert result["errno"] == errno.EDQUOT
        assert 0 < result["count"] < 2_000_000
        assert after["errno"] == errno.EDQUOT
        assert after["written"] <= MIB


def test_tmp_not_counted(address: str) -> None:
    with Sandbox(disk=16, memory=128, address=address).create() as sandbox:
        in_tmp = sandbox.process.exec(
            "dd", "if=/dev/zero", "of=/tmp/big", "bs=1M", "count=32"
        )

        assert in_tmp.wait() == 0


def test_escape_attempts_fail(address: str) -> None:
    with Sandbox(disk=32, address=address).create() as sandbox:
        results = run_python(sandbox, ESCAPE)
        after = run_python(sandbox, FILL, "/root/target/fill")

        assert results["fssetxattr_projid"] != 0
        assert results["btrfs_subvol_create"] != 0
        assert results["btrfs_qgroup_limit"] != 0
        assert results["btrfs_quota_disable"] != 0
        assert results["quotactl"] != 0
        assert sandbox.fs.list_files("/root/target") != []
        assert "escape" not in {e.name for e in sandbox.fs.list_files("/root/target")}
        assert after["errno"] == errno.EDQUOT
        assert after["written"] <= 32 * MIB


# ----------------------------------------------------------------- file API


def test_file_api_resource_exhausted(address: str) -> None:
    with Sandbox(disk=32, address=address).create() as sandbox:
        with pytest.raises(errors.ResourceExhausted, match="/root/big") as caught:
            sandbox.fs.write_bytes("/root/big", os.urandom(48 * MIB))

        assert "disk limit" in str(caught.value)
        assert [e.name for e in sandbox.fs.list_files("/root")] == []
        sandbox.fs.write_bytes("/root/small", b"fits")
        assert sandbox.fs.read_bytes("/root/small") == b"fits"


def test_upload_past_limit_status(
    address: str, channel: grpc.Channel, tmp_path: Path
) -> None:
    source = tmp_path / "big"
    with open(source, "wb") as file:
        for _ in range(40):
            file.write(os.urandom(MIB))
    with (
        Sandbox(disk=24, address=address).create() as sandbox,
        Sandbox(disk=64, address=address).create() as neighbour,
    ):
        with pytest.raises(errors.ResourceExhausted, match="/root/big"):
            sandbox.fs.upload_file(str(source), "/root/big")

        assert sandbox.fs.list_files("/root") == []
        neighbour.fs.upload_file(str(source), "/root/big")
        assert neighbour.fs.stat_file("/root/big").size == 40 * MIB
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        reply = stub.Get(pb.GetRequest(sandbox_id=neighbour.sandbox_id))
        assert reply.sandbox.state == pb.SANDBOX_STATE_RUNNING


# ---------------------------------------------------------- spec and input


def test_limit_in_get(address: str, stub: sandbox_pb2_grpc.SandboxServiceStub) -> None:
    with (
        Sandbox(disk="2Gi", address=address).create() as sized,
        Sandbox(address=address).create() as default,
    ):
        reply = stub.Get(pb.GetRequest(sandbox_id=sized.sandbox_id))

        assert reply.sandbox.spec.disk_mib == 2048
        assert sized.status().spec.disk_mib == 2048
        assert default.status().spec.disk_mib == DEFAULT_DISK_MIB


def test_stats_disk_bytes(address: str) -> None:
    with Sandbox(disk=64, address=address).create() as sandbox:
        empty = sandbox.stats().disk_bytes
        written = sandbox.process.exec(
            "sh", "-c", "dd if=/dev/zero of=/root/f bs=1M count=20"
        )
        assert written.wait() == 0

        # No sync: the count includes data that no commit has written yet.
        used = sandbox.stats().disk_bytes

        assert empty < 4 * MIB
        assert 20 * MIB <= used <= 24 * MIB


def test_aio_and_embedded_disk(embedded: EmbeddedEngine) -> None:
    async def scenario() -> tuple[int, dict[str, Any]]:
        async with await AsyncSandbox(disk=24, address=embedded.address).create() as sb:
            status = await sb.status()
            process = await sb.process.exec(
                "/usr/bin/python3", "-c", FILL, "/root/fill"
            )
            assert await process.wait() == 0
            return status.spec.disk_mib, json.loads(await process.stdout.read())

    disk_mib, result = asyncio.run(scenario())

    assert disk_mib == 24
    assert result["errno"] == errno.EDQUOT
    assert result["written"] <= 24 * MIB


def test_cli_disk_in_inspect(cli: CliRunner) -> None:
    created = cli("sandbox", "create", "--disk", "96")
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    try:
        inspected = cli("sandbox", "inspect", sandbox_id)

        assert inspected.returncode == 0, inspected.stderr
        assert json.loads(inspected.stdout)["spec"]["disk_mib"] == 96
    finally:
        cli("sandbox", "rm", sandbox_id)


def test_cli_run_disk_limit(cli: CliRunner) -> None:
    result = cli(
        "run", "--disk", "16", "--", "dd", "if=/dev/zero", "of=/root/f", "bs=1M"
    )

    assert result.returncode != 0
    assert "Disk quota exceeded" in result.stderr


@pytest.mark.parametrize("value", [0, -1, 8, 1 << 31, "12Ki", "lots", True, 1.5])
def test_bad_disk_rejected(daemon: Daemon, value: object) -> None:
    before = daemon.settled_layers()

    with pytest.raises(errors.InvalidArgument, match="disk") as caught:
        Sandbox(disk=value, address=daemon.address).create()  # type: ignore[arg-type]

    assert "MiB" in str(caught.value)
    assert daemon.settled_layers() == before


def test_bad_disk_mib_status(stub: sandbox_pb2_grpc.SandboxServiceStub) -> None:
    for value in (0, -5, 4):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Create(pb.CreateRequest(spec=pb.SandboxSpec(disk_mib=value)))

        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "disk" in caught.value.details()


def test_cli_bad_disk(cli: CliRunner) -> None:
    result = cli("run", "--disk", "plenty", "--", "true")

    assert result.returncode != 0
    assert "disk" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- lifetime


def _loop_devices(data_dir: Path) -> list[str]:
    return loop.devices_backed_by(str(data_dir / IMAGE_NAME))


def _wait_detached(data_dir: Path, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while _loop_devices(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _loop_devices(data_dir)


def _stale_devices(data_dir: Path) -> list[str]:
    """Return the loop devices still attached to an unlinked layer image."""
    return loop.devices_backed_by(f"{data_dir / IMAGE_NAME} (deleted)")


def _mounts_at(path: Path, pid: int | str = "self") -> int:
    """Return how many mounts are at ``path`` in the mount namespace of ``pid``."""
    target = str(path)
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8") as file:
        return sum(1 for line in file if line.split(" ")[4] == target)


def test_close_releases_layers(
    engine_factory: Callable[[], EngineRunner],
) -> None:
    runner = engine_factory()
    data_dir = runner.data_dir
    sandbox_id = runner.create(disk_mib=32)
    # The file system is mounted in the zygote's namespace only, and the
    # engine reaches it through the zygote's root.
    zygote = runner.zygote_pid
    layer = runner.engine.layers.path
    assert (layer / sandbox_id).is_dir()
    assert len(_loop_devices(data_dir)) == 1
    assert not is_mount_point(data_dir / "sandboxes")
    assert _mounts_at(data_dir / "sandboxes", zygote) == 1

    runner.terminate(sandbox_id)
    assert not (layer / sandbox_id).exists()
    runner.close()

    assert _wait_detached(data_dir) == []
    assert not is_mount_point(data_dir / "sandboxes")
    assert not (data_dir / IMAGE_NAME).exists()


def test_crash_leftovers_swept(
    crash_daemon_factory: Callable[[], Daemon],
    daemon_factory: Callable[..., Daemon],
) -> None:
    crashed = crash_daemon_factory()
    data_dir = crashed.data_dir
    sandbox = Sandbox(address=crashed.address).create()
    sandbox.close()
    assert len(_loop_devices(data_dir)) == 1
    children = crashed.descendants()
    crashed.process.kill()
    crashed.process.wait()
    # The file system was mounted only in the namespace of the engine's
    # processes, so the crash leaves no mount in the host's namespace.
    assert _mounts_at(data_dir / "sandboxes") == 0
    psutil.wait_procs(children, timeout=30)

    # No warm sandboxes, so that the only layer is the new sandbox's.
    restarted = daemon_factory("--warm-pool", "0", data_dir=data_dir)
    zygote = restarted.zygote_pid()
    layers = restarted.layers_dir()
    with Sandbox(disk=32, address=restarted.address).create() as fresh:
        result = run_python(fresh, FILL, "/root/fill")

        assert result["errno"] == errno.EDQUOT
        assert _mounts_at(data_dir / "sandboxes") == 0
        assert _mounts_at(data_dir / "sandboxes", zygote) == 1
        assert sorted(os.listdir(layers)) == [fresh.sandbox_id]
        # The new start unlinked the old image, and its loop device detached
        # once the crashed engine's sandboxes were gone. The kernel may give
        # the new image the same device.
        deadline = time.monotonic() + 10
        while _stale_devices(data_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stale_devices(data_dir) == []
        assert len(_loop_devices(data_dir)) == 1

    assert restarted.stop() == 0
    assert _wait_detached(data_dir) == []
    assert _mounts_at(data_dir / "sandboxes") == 0
