"""Uploads and downloads through FileService against the shared daemon.

Sizes cover an empty file, a small one, one past gRPC's 4 MiB default message
limit and, in a slow test, 1 GiB checked by sha256 on both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from engine import Sandbox, SandboxInstance, errors
from engine.v1 import filesystem_pb2 as pb
from engine.v1 import filesystem_pb2_grpc

if TYPE_CHECKING:
    from conftest import EngineRunner

MIB = 1024 * 1024
SIZES = [0, 100 * 1024, 16 * MIB + 1]


def run(sandbox: SandboxInstance, script: str) -> str:
    """Run ``script`` with sh in the sandbox, assert it succeeds, return its stdout."""
    process = sandbox.process.exec("sh", "-c", script)
    code = process.wait()
    stderr = process.stderr.read()
    assert code == 0, f"{script!r} exited with {code}: {stderr}"
    return process.stdout.read()


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` in 1 MiB chunks; return their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, MIB))
            file.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def file_stub(channel: grpc.Channel) -> filesystem_pb2_grpc.FileServiceStub:
    return filesystem_pb2_grpc.FileServiceStub(channel)


@pytest.mark.parametrize("size", SIZES, ids=["0B", "100KiB", "16MiB+1"])
def test_upload_download_roundtrip(
    sandbox: SandboxInstance, tmp_path: Path, size: int
) -> None:
    source = tmp_path / "source"
    expected = random_file(source, size)

    sandbox.fs.upload_file(source, "/tmp/data")

    info = sandbox.fs.stat_file("/tmp/data")
    assert info.size == size
    assert info.type == "file"
    inside = run(sandbox, "sha256sum /tmp/data").split()[0]
    assert inside == expected

    target = tmp_path / "target"
    sandbox.fs.download_file("/tmp/data", target)
    assert target.stat().st_size == size
    assert sha256_of(target) == expected
    leftovers = [name for name in os.listdir(tmp_path) if name.endswith(".part")]
    assert leftovers == []


@pytest.mark.parametrize("size", SIZES, ids=["0B", "100KiB", "16MiB+1"])
def test_bytes_roundtrip(sandbox: SandboxInstance, size: int) -> None:
    data = os.urandom(size)
    sandbox.fs.write_bytes("/root/data", data)
    assert sandbox.fs.read_bytes("/root/data") == data


def test_text_roundtrip(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_text("/tmp/text", "grüße\n")
    assert sandbox.fs.read_text("/tmp/text") == "grüße\n"
    assert sandbox.fs.read_bytes("/tmp/text") == "grüße\n".encode()


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o755, 0o4711, 0o1777, 0o000])
def test_upload_mode_exact(sandbox: SandboxInstance, mode: int) -> None:
    sandbox.fs.write_bytes("/tmp/moded", b"x", mode=mode)
    assert sandbox.fs.stat_file("/tmp/moded").mode == mode
    shown = run(sandbox, "stat -c %a /tmp/moded").strip()
    assert int(shown, 8) == mode


def test_upload_replaces_mode(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/file", b"old", mode=0o600)
    sandbox.fs.write_bytes("/tmp/file", b"new", mode=0o640)
    assert sandbox.fs.stat_file("/tmp/file").mode == 0o640
    assert sandbox.fs.read_bytes("/tmp/file") == b"new"


def test_upload_parents(sandbox: SandboxInstance) -> None:
    with pytest.raises(errors.NotFound, match="/tmp/a/b/file"):
        sandbox.fs.write_bytes("/tmp/a/b/file", b"x")
    sandbox.fs.write_bytes("/tmp/a/b/file", b"x", parents=True)
    assert sandbox.fs.read_bytes("/tmp/a/b/file") == b"x"
    assert sandbox.fs.stat_file("/tmp/a/b").mode == 0o755


def test_upload_without_overwrite(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/kept", b"first")
    with pytest.raises(errors.AlreadyExists, match="/tmp/kept"):
        sandbox.fs.upload_fileobj(io.BytesIO(b"second"), "/tmp/kept", overwrite=False)
    assert sandbox.fs.read_bytes("/tmp/kept") == b"first"
    sandbox.fs.upload_fileobj(io.BytesIO(b"fresh"), "/tmp/new", overwrite=False)
    assert sandbox.fs.read_bytes("/tmp/new") == b"fresh"
    assert len(sandbox.fs.list_files("/tmp")) == 2


def test_download_stream_shape(
    sandbox: SandboxInstance, file_stub: filesystem_pb2_grpc.FileServiceStub
) -> None:
    data = os.urandom(5 * MIB + 3)
    sandbox.fs.write_bytes("/tmp/shape", data, mode=0o640)
    request = pb.DownloadFileRequest(sandbox_id=sandbox.sandbox_id, path="/tmp/shape")
    responses = list(file_stub.DownloadFile(request))

    assert responses[0].WhichOneof("message") == "header"
    assert responses[0].header.size == len(data)
    assert responses[0].header.mode == 0o640
    kinds = {response.WhichOneof("message") for response in responses[1:]}
    assert kinds == {"data"}
    assert max(len(response.data) for response in responses[1:]) <= MIB
    assert b"".join(response.data for response in responses[1:]) == data


def test_raw_upload_chunks(
    sandbox: SandboxInstance, file_stub: filesystem_pb2_grpc.FileServiceStub
) -> None:
    header = pb.UploadFileHeader(
        sandbox_id=sandbox.sandbox_id, path="/tmp/raw", mode=0o640
    )
    chunks = [os.urandom(MIB) for _ in range(5)] + [b"", b"tail"]
    requests = [pb.UploadFileRequest(header=header)]
    requests += [pb.UploadFileRequest(data=chunk) for chunk in chunks]
    requests.append(pb.UploadFileRequest(end=pb.UploadFileEnd(size=5 * MIB + 4)))

    reply = file_stub.UploadFile(iter(requests))

    assert reply.size == 5 * MIB + 4
    assert sandbox.fs.read_bytes("/tmp/raw") == b"".join(chunks)
    assert sandbox.fs.stat_file("/tmp/raw").mode == 0o640


def test_concurrent_reader_sees_whole_files(sandbox: SandboxInstance) -> None:
    old = os.urandom(8 * MIB)
    new = os.urandom(64 * MIB)
    hashes = {hashlib.sha256(data).hexdigest() for data in (old, new)}
    sandbox.fs.write_bytes("/tmp/target", old)
    reader = sandbox.process.exec(
        "sh",
        "-c",
        "while [ ! -e /tmp/stop ]; do sha256sum /tmp/target; done",
    )
    try:
        # Alternate the content, so that every upload replaces a whole file.
        for data in (new, old, new, old, new):
            sandbox.fs.write_bytes("/tmp/target", data)
    finally:
        sandbox.fs.write_bytes("/tmp/stop", b"")
    assert reader.wait(timeout=60) == 0
    lines = reader.stdout.read().splitlines()
    seen = {line.split()[0] for line in lines}

    assert reader.stderr.read() == ""
    assert len(lines) >= 2
    assert seen <= hashes, f"a reader saw a partial file: {seen - hashes}"
    names = [entry.name for entry in sandbox.fs.list_files("/tmp")]
    assert sorted(names) == ["stop", "target"]


def test_cancelled_upload_leaves_nothing(
    sandbox: SandboxInstance, file_stub: filesystem_pb2_grpc.FileServiceStub
) -> None:
    sandbox.fs.write_bytes("/root/target", b"before")
    sent = threading.Event()
    release = threading.Event()
    header = pb.UploadFileHeader(sandbox_id=sandbox.sandbox_id, path="/root/target")

    def requests() -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(header=header)
        for _ in range(3):
            yield pb.UploadFileRequest(data=os.urandom(MIB))
        sent.set()
        release.wait(30)

    future = file_stub.UploadFile.future(requests())
    assert sent.wait(30)
    time.sleep(0.5)
    future.cancel()
    release.set()

    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    deadline = time.monotonic() + 10
    names = [entry.name for entry in sandbox.fs.list_files("/root")]
    while names != ["target"] and time.monotonic() < deadline:
        time.sleep(0.1)
        names = [entry.name for entry in sandbox.fs.list_files("/root")]
    assert names == ["target"]
    assert sandbox.fs.read_bytes("/root/target") == b"before"


def test_local_read_error_raised(sandbox: SandboxInstance) -> None:
    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError(5, "simulated local read error")
            return b"x" * MIB

    sandbox.fs.write_bytes("/tmp/target", b"before")
    with pytest.raises(OSError, match="simulated local read error"):
        sandbox.fs.upload_fileobj(Failing(), "/tmp/target")
    assert sandbox.fs.read_bytes("/tmp/target") == b"before"


def test_download_missing_keeps_local(sandbox: SandboxInstance, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"local")
    with pytest.raises(errors.NotFound, match="/tmp/missing"):
        sandbox.fs.download_file("/tmp/missing", target)
    assert target.read_bytes() == b"local"
    assert sorted(os.listdir(tmp_path)) == ["target"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_gib_sha256(address: str, tmp_path: Path) -> None:
    size = 1024 * MIB
    source = tmp_path / "gib"
    target = tmp_path / "gib.out"
    expected = random_file(source, size)
    try:
        with Sandbox(address=address).create() as sandbox:
            started = time.monotonic()
            sandbox.fs.upload_file(source, "/root/gib")
            upload_seconds = time.monotonic() - started
            inside = run(sandbox, "sha256sum /root/gib").split()[0]
            started = time.monotonic()
            sandbox.fs.download_file("/root/gib", target)
            download_seconds = time.monotonic() - started
            assert inside == expected
            assert target.stat().st_size == size
            assert sha256_of(target) == expected
            print(
                f"1 GiB upload {size / MIB / upload_seconds:.0f} MiB/s,"
                f" download {size / MIB / download_seconds:.0f} MiB/s"
            )
    finally:
        source.unlink(missing_ok=True)
        target.unlink(missing_ok=True)


def test_engine_aborted_write_keeps_file(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox()
    files = engine.engine.files

    async def once(data: bytes) -> AsyncIterator[bytes]:
        yield data

    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * MIB
        yield b"y" * MIB
        raise RuntimeError("the source failed")

    async def stalled() -> AsyncIterator[bytes]:
        yield b"z" * MIB
        await asyncio.sleep(3600)
        yield b""

    async def scenario() -> tuple[bytes, list[str]]:
        await files.write_file(sandbox_id, "/root/kept", once(b"before"))
        with pytest.raises(RuntimeError, match="the source failed"):
            await files.write_file(sandbox_id, "/root/kept", failing())
        task = asyncio.ensure_future(
            files.write_file(sandbox_id, "/root/kept", stalled())
        )
        await asyncio.sleep(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        content = await files.read_file(sandbox_id, "/root/kept")
        data = b"".join([chunk async for chunk in content.chunks])
        entries, _ = await files.list_files(sandbox_id, "/root")
        return data, [entry.name for entry in entries]

    data, names = engine.call(scenario())
    assert data == b"before"
    assert names == ["kept"]
