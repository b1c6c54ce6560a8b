"""VolumeService over the daemon's unix socket, through the SDK and the raw stubs."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine import Sandbox, SandboxInstance, Volume
from engine.core.models import VolumeMount
from engine.errors import FailedPrecondition, InvalidArgument, NotFound
from engine.sdk.volumes import VolumeClient
from engine.storage.volumes import PathType
from engine.v1 import volume_pb2 as pb
from engine.v1 import volume_pb2_grpc

if TYPE_CHECKING:
    from conftest import Daemon

MIB = 1024 * 1024


@pytest.fixture
def client(address: str) -> Iterator[VolumeClient]:
    with VolumeClient(address) as opened:
        yield opened


@pytest.fixture
def volume_stub(channel: grpc.Channel) -> volume_pb2_grpc.VolumeServiceStub:
    return volume_pb2_grpc.VolumeServiceStub(channel)


@pytest.fixture
def volume(client: VolumeClient, address: str) -> Iterator[str]:
    """A new volume on the shared daemon, deleted with its sandboxes at teardown."""
    name = f"api-{uuid.uuid4().hex[:10]}"
    client.create(name)
    yield name
    for info in client.list():
        if info.name != name:
            continue
        for sandbox_id in info.sandbox_ids:
            with contextlib.closing(Sandbox.connect(sandbox_id, address=address)) as sb:
                sb.terminate()
        client.delete(name)


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A host directory outside the data dir with a file no volume call may touch."""
    directory = Path(tempfile.mkdtemp(prefix="eng-host-", dir="/tmp"))
    (directory / "secret").write_text("host secret\n")
    try:
        yield directory
    finally:
        content = (directory / "secret").read_text()
        shutil.rmtree(directory)
    assert content == "host secret\n"


def run(sb: SandboxInstance, script: str) -> str:
    process = sb.process.exec("sh", "-c", script)
    code = process.wait()
    assert code == 0, process.stderr.read()
    return process.stdout.read()


def volume_info(client: VolumeClient, name: str) -> object:
    return next(info for info in client.list() if info.name == name)


# Volumes.


def test_create_get_or_create(volume_stub: volume_pb2_grpc.VolumeServiceStub) -> None:
    name = f"api-{uuid.uuid4().hex[:10]}"
    try:
        first = volume_stub.Create(pb.VolumeCreateRequest(name=name))
        assert first.created
        assert first.volume.name == name
        assert not first.volume.HasField("size_bytes")
        second = volume_stub.Create(pb.VolumeCreateRequest(name=name))
        assert not second.created
        assert second.volume.created_at == first.volume.created_at
    finally:
        volume_stub.Delete(pb.VolumeDeleteRequest(name=name))


def test_create_invalid_name(volume_stub: volume_pb2_grpc.VolumeServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        volume_stub.Create(pb.VolumeCreateRequest(name="Bad/Name"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'Bad/Name'" in raised.value.details()


def test_list_sizes(client: VolumeClient, volume: str) -> None:
    client.write_bytes(volume, "a", b"x" * 1000)
    client.write_bytes(volume, "dir/b", b"y" * 24)
    info = volume_info(client, volume)
    assert info.size_bytes == 1024
    assert info.file_count == 2
    assert info.sandbox_ids == ()


def test_delete_unknown(volume_stub: volume_pb2_grpc.VolumeServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        volume_stub.Delete(pb.VolumeDeleteRequest(name="no-such-volume"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-volume" in raised.value.details()


def test_delete_mounted(
    volume_stub: volume_pb2_grpc.VolumeServiceStub, address: str, volume: str
) -> None:
    with Sandbox(address=address, volumes=[Volume(volume, "/data")]).create() as sb:
        with pytest.raises(grpc.RpcError) as raised:
            volume_stub.Delete(pb.VolumeDeleteRequest(name=volume))
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert sb.sandbox_id in raised.value.details()
        listed = volume_stub.List(pb.VolumeListRequest())
        mounted = [v for v in listed.volumes if v.name == volume]
        assert list(mounted[0].sandbox_ids) == [sb.sandbox_id]
    volume_stub.Delete(pb.VolumeDeleteRequest(name=volume))
    with pytest.raises(grpc.RpcError) as raised:
        volume_stub.StatPath(pb.VolumeStatPathRequest(volume=volume, path=""))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # The fixture's teardown finds nothing left to delete.
    volume_stub.Create(pb.VolumeCreateRequest(name=volume))


def test_delete_mounted_sdk_error(
    client: VolumeClient, address: str, volume: str
) -> None:
    with (
        Sandbox(address=address, volumes=[Volume(volume, "/data")]).create(),
        pytest.raises(FailedPrecondition, match="terminate those sandboxes"),
    ):
        client.delete(volume)


# Files.


def test_upload_download_chunks(client: VolumeClient, volume: str) -> None:
    data = os.urandom(2 * MIB + MIB // 2 + 3)
    info = client.upload(volume, "/big/blob.bin", [data], mode=0o600)
    assert info.path == "big/blob.bin"
    assert info.size == len(data)
    assert info.mode == 0o600
    assert info.type == PathType.FILE
    chunks = list(client.iter_bytes(volume, "big/blob.bin"))
    assert len(chunks) == 3
    assert max(len(chunk) for chunk in chunks) == MIB
    assert b"".join(chunks) == data


def test_upload_file_and_download_file(
    client: VolumeClient, volume: str, tmp_path: Path
) -> None:
    local = tmp_path / "script.sh"
    local.write_text("#!/bin/sh\necho hi\n")
    local.chmod(0o750)
    info = client.upload_file(volume, local, "bin/script.sh")
    assert info.mode == 0o750
    target = client.download_file(volume, "bin/script.sh", tmp_path / "back.sh")
    assert target.read_text() == "#!/bin/sh\necho hi\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_upload_empty_file(client: VolumeClient, volume: str) -> None:
    info = client.write_bytes(volume, "empty", b"")
    assert info.size == 0
    assert client.read_bytes(volume, "empty") == b""


def test_upload_without_header(
    volume_stub: volume_pb2_grpc.VolumeServiceStub, volume: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        volume_stub.Upload(iter([pb.VolumeUploadRequest(data=b"x")]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in raised.value.details()


def test_upload_second_header(
    volume_stub: volume_pb2_grpc.VolumeServiceStub, client: VolumeClient, volume: str
) -> None:
    header = pb.VolumeUploadHeader(volume=volume, path="f")
    messages = [
        pb.VolumeUploadRequest(header=header),
        pb.VolumeUploadRequest(data=b"x"),
        pb.VolumeUploadRequest(header=header),
    ]
    with pytest.raises(grpc.RpcError) as raised:
        volume_stub.Upload(iter(messages))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    entries, _ = client.list_path(volume, "")
    assert entries == []


def test_upload_cancelled_leaves_nothing(
    volume_stub: volume_pb2_grpc.VolumeServiceStub,
    client: VolumeClient,
    daemon: Daemon,
    volume: str,
) -> None:
    client.write_bytes(volume, "f", b"old")
    header = pb.VolumeUploadHeader(volume=volume, path="f")

    def messages() -> Iterator[pb.VolumeUploadRequest]:
        yield pb.VolumeUploadRequest(header=header)
        yield pb.VolumeUploadRequest(data=b"x" * MIB)
        raise RuntimeError("client gave up")

    # The client library cancels the call when its request iterator raises.
    with pytest.raises(grpc.RpcError):
        volume_stub.Upload(messages())
    host = daemon.data_dir / "volumes" / volume / "data"
    deadline = time.monotonic() + 10
    while os.listdir(host) != ["f"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(host) == ["f"]
    assert client.read_bytes(volume, "f") == b"old"


@pytest.mark.parametrize(
    ("volume_name", "path", "code"),
    [
        ("no-such-volume", "f", grpc.StatusCode.NOT_FOUND),
        ("BAD", "f", grpc.StatusCode.INVALID_ARGUMENT),
        (None, "", grpc.StatusCode.INVALID_ARGUMENT),
        (None, "/", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_upload_errors(
    volume_stub: volume_pb2_grpc.VolumeServiceStub,
    volume: str,
    volume_name: str | None,
    path: str,
    code: grpc.StatusCode,
) -> None:
    header = pb.VolumeUploadHeader(volume=volume_name or volume, path=path)
    with pytest.raises(grpc.RpcError) as raised:
        volume_stub.Upload(iter([pb.VolumeUploadRequest(header=header)]))
    assert raised.value.code() == code


def test_download_errors(client: VolumeClient, volume: str) -> None:
    client.write_bytes(volume, "dir/f", b"x")
    with pytest.raises(NotFound, match="/missing in volume"):
        client.read_bytes(volume, "missing")
    with pytest.raises(InvalidArgument, match="is a directory"):
        client.read_bytes(volume, "dir")


def test_list_path_and_globs(client: VolumeClient, volume: str) -> None:
    for path in ("a.txt", "b.log", "dir/c.txt", "dir/sub/d.txt"):
        client.write_bytes(volume, path, b"x")

    def listed(pattern: str) -> list[str]:
        entries, truncated = client.list_path(volume, pattern)
        assert not truncated
        return [entry.path for entry in entries]

    assert listed("") == ["a.txt", "b.log", "dir"]
    assert listed("dir") == ["dir/c.txt", "dir/sub"]
    assert listed("*.txt") == ["a.txt"]
    assert listed("dir/**") == ["dir", "dir/c.txt", "dir/sub", "dir/sub/d.txt"]
    assert listed("**/*.txt") == ["a.txt", "dir/c.txt", "dir/sub/d.txt"]
    entries, truncated = client.list_path(volume, "**", limit=2)
    assert len(entries) == 2
    assert truncated


def test_stat_path(client: VolumeClient, volume: str) -> None:
    client.write_bytes(volume, "dir/f", b"12345", mode=0o640)
    info = client.stat(volume, "dir/f")
    assert info.type == PathType.FILE
    assert info.size == 5
    assert info.mode == 0o640
    assert client.stat(volume, "dir").type == PathType.DIRECTORY
    assert client.stat(volume, "/").path == ""


def test_move_and_copy(client: VolumeClient, volume: str) -> None:
    client.write_bytes(volume, "src/a", b"a")
    client.write_bytes(volume, "src/deep/b", b"b")
    copied = client.copy(volume, "src", "copy")
    assert copied.path == "copy"
    assert client.read_bytes(volume, "copy/deep/b") == b"b"
    moved = client.move(volume, "copy/a", "copy/deep")
    assert moved.path == "copy/deep/a"
    renamed = client.move(volume, "copy", "renamed")
    assert renamed.type == PathType.DIRECTORY
    assert client.read_bytes(volume, "renamed/deep/a") == b"a"
    assert client.read_bytes(volume, "src/a") == b"a"
    with pytest.raises(NotFound):
        client.stat(volume, "copy")
    with pytest.raises(InvalidArgument, match="cannot copy the root"):
        client.copy(volume, "", "x")


def test_delete_path(client: VolumeClient, volume: str) -> None:
    for path in ("a.txt", "b.txt", "keep.log", "dir/c.txt"):
        client.write_bytes(volume, path, b"x")
    assert client.delete_path(volume, "*.txt") == ["a.txt", "b.txt"]
    assert client.delete_path(volume, "dir") == ["dir"]
    entries, _ = client.list_path(volume, "")
    assert [entry.path for entry in entries] == ["keep.log"]
    with pytest.raises(NotFound):
        client.delete_path(volume, "*.txt")


@pytest.mark.parametrize("pattern", ["", "/", ".", "dir/.."])
def test_delete_path_root_rejected(
    volume_stub: volume_pb2_grpc.VolumeServiceStub,
    client: VolumeClient,
    volume: str,
    pattern: str,
) -> None:
    client.write_bytes(volume, "dir/f", b"x")
    request = pb.VolumeDeletePathRequest(volume=volume, pattern=pattern)
    with pytest.raises(grpc.RpcError) as raised:
        volume_stub.DeletePath(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "root of volume" in raised.value.details()
    assert client.read_bytes(volume, "dir/f") == b"x"


# Sandboxes and volumes together.


def test_sandbox_reads_upload_and_writes_back(
    client: VolumeClient, address: str, volume: str
) -> None:
    client.write_bytes(volume, "input/data.txt", b"from the host\n")
    mounts = [Volume(volume, "/root/data")]
    with Sandbox(address=address, volumes=mounts).create() as sb:
        assert sb.status().spec.volumes == (VolumeMount(volume, "/root/data"),)
        assert run(sb, "cat /root/data/input/data.txt") == "from the host\n"
        run(sb, "echo appended >> /root/data/input/data.txt")
        run(sb, "mkdir /root/data/input/new && echo out > /root/data/input/new/f")
    assert client.read_bytes(volume, "input/data.txt") == (b"from the host\nappended\n")
    assert client.read_bytes(volume, "input/new/f") == b"out\n"


def test_sandbox_read_only_volume(
    client: VolumeClient, address: str, volume: str
) -> None:
    client.write_bytes(volume, "f", b"ro\n")
    mounts = [Volume(volume, "/mnt/a/b/c", read_only=True)]
    with Sandbox(address=address, volumes=mounts).create() as sb:
        assert run(sb, "cat /mnt/a/b/c/f") == "ro\n"
        process = sb.process.exec("sh", "-c", "echo x > /mnt/a/b/c/f")
        assert process.wait() != 0
        assert "Read-only file system" in process.stderr.read()
    assert client.read_bytes(volume, "f") == b"ro\n"


def test_sandbox_invalid_volume(address: str) -> None:
    settings = Sandbox(address=address, volumes=[Volume("data", "/proc/data")])
    with pytest.raises(InvalidArgument, match="inside /proc"):
        settings.create()
    with pytest.raises(InvalidArgument, match=r"expected engine\.Volume"):
        Sandbox(address=address, volumes=["data:/data"])  # type: ignore[list-item]


def test_symlinks_from_sandbox_stay_inside(
    client: VolumeClient, address: str, volume: str, host_dir: Path
) -> None:
    secret = host_dir / "secret"
    links = (
        "ln -s / /data/to-root"
        " && ln -s ../../../../../../../.. /data/up"
        f" && ln -s {host_dir} /data/to-host"
        f" && ln -s {secret} /data/to-secret"
        " && ln -s /etc/passwd /data/passwd"
    )
    with Sandbox(address=address, volumes=[Volume(volume, "/data")]).create() as sb:
        run(sb, links)

        # Reads resolve inside the volume, where the targets do not exist.
        for path in ("to-root/etc/passwd", "up/etc/passwd", "passwd", "to-secret"):
            with pytest.raises(NotFound):
                client.read_bytes(volume, path)
        with pytest.raises(NotFound):
            client.read_bytes(volume, "to-host/secret")

        # Writes through the links land in the volume or fail.
        assert client.write_bytes(volume, "up/escaped.txt", b"x").path == (
            "up/escaped.txt"
        )
        assert not Path("/escaped.txt").exists()
        assert run(sb, "cat /data/escaped.txt") == "x"
        client.write_bytes(volume, "to-root/tmp/also.txt", b"y")
        assert run(sb, "cat /data/tmp/also.txt") == "y"
        with pytest.raises(NotFound):
            client.write_bytes(volume, "to-host/secret", b"overwritten")
        assert not (host_dir / "new").exists()

        # Listing through a link lists the volume itself.
        entries, _ = client.list_path(volume, "to-root/*")
        assert "to-root/escaped.txt" in [entry.path for entry in entries]
        entries, _ = client.list_path(volume, "to-host/*")
        assert entries == []
        link = client.stat(volume, "to-host")
        assert link.type == PathType.SYMLINK
        assert link.target == str(host_dir)

        # Deleting, moving and copying reach nothing outside either.
        with pytest.raises(NotFound):
            client.delete_path(volume, "to-host/secret")
        with pytest.raises(NotFound):
            client.delete_path(volume, "to-host/*")
        with pytest.raises(NotFound):
            client.move(volume, "to-host/secret", "stolen")
        with pytest.raises(NotFound):
            client.copy(volume, "to-root/etc/passwd", "stolen")
        moved = client.move(volume, "escaped.txt", "to-host")
        assert moved.path == "to-host"
        assert moved.type == PathType.FILE
        copied = client.copy(volume, "to-root", "root-copy")
        assert copied.type == PathType.SYMLINK
        assert client.delete_path(volume, "up") == ["up"]
        assert run(sb, "ls -A /data | sort | tr '\\n' ' '") == (
            "passwd root-copy tmp to-host to-root to-secret "
        )
    assert secret.read_text() == "host secret\n"
    assert Path("/etc/passwd").exists()


def test_files_written_by_one_sandbox_usable_by_next(
    client: VolumeClient, address: str, volume: str
) -> None:
    mounts = [Volume(volume, "/root/data")]
    with Sandbox(address=address, volumes=mounts).create() as first:
        run(first, "echo one > /root/data/f && chmod 600 /root/data/f")
        run(first, "mkdir -m 700 /root/data/private && echo p > /root/data/private/p")
    with Sandbox(address=address, volumes=mounts).create() as second:
        run(second, "echo two >> /root/data/f && echo q >> /root/data/private/p")
        assert run(second, "cat /root/data/f /root/data/private/p") == (
            "one\ntwo\np\nq\n"
        )
    assert client.read_bytes(volume, "f") == b"one\ntwo\n"


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(
        health_pb2.HealthCheckRequest(service="engine.v1.VolumeService")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(stub.ServerReflectionInfo(iter([request])))
    names = [s.name for s in response.list_services_response.service]
    assert "engine.v1.VolumeService" in names


def test_volume_survives_daemon_restart(
    daemon_factory: Callable[..., Daemon],
) -> None:
    first = daemon_factory()
    mounts = [Volume("persist", "/root/data")]
    with Sandbox(address=first.address, volumes=mounts).create() as sb:
        run(sb, "echo survives > /root/data/f && sync")
    with VolumeClient(first.address) as client:
        client.write_bytes("persist", "uploaded", b"also\n")
    assert first.stop() == 0, first.log()

    second = daemon_factory(data_dir=first.data_dir)
    try:
        with VolumeClient(second.address) as client:
            listed = {info.name: info for info in client.list()}
            assert listed["persist"].file_count == 2
            assert client.read_bytes("persist", "f") == b"survives\n"
        with Sandbox(address=second.address, volumes=mounts).create() as sb:
            assert run(sb, "cat /root/data/f /root/data/uploaded") == (
                "survives\nalso\n"
            )
            run(sb, "echo more >> /root/data/f")
        with VolumeClient(second.address) as client:
            assert client.read_bytes("persist", "f") == b"survives\nmore\n"
            client.delete("persist")
    finally:
        # Stopped here, so that the factory removes the shared data dir only
        # after both daemons exited.
        assert second.stop() == 0, second.log()
