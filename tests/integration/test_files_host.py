"""Transfers through a host file, which local clients on the unix socket use."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest

from engine.errors import NotFound
from engine.sdk import SandboxInstance
from engine.v1 import filesystem_pb2 as pb
from engine.v1 import filesystem_pb2_grpc, sandbox_pb2, sandbox_pb2_grpc
from tests.integration.test_grpc_auth import create_token, free_port


def host_file(path: Path) -> pb.HostFile:
    status = path.stat()
    return pb.HostFile(path=str(path), device=status.st_dev, inode=status.st_ino)


def upload(
    channel: grpc.Channel, sandbox_id: str, target: str, source: pb.HostFile
) -> pb.UploadFileResponse:
    header = pb.UploadFileHeader(sandbox_id=sandbox_id, path=target, host_file=source)
    requests = [
        pb.UploadFileRequest(header=header),
        pb.UploadFileRequest(end=pb.UploadFileEnd(size=0)),
    ]
    stub = filesystem_pb2_grpc.FileServiceStub(channel)
    return stub.UploadFile(iter(requests), timeout=60)


def test_sdk_round_trip_through_host_files(
    sandbox: SandboxInstance, tmp_path: Path
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    sandbox.fs.upload_file(source, "/root/copy.bin", mode=0o640)
    info = sandbox.fs.stat_file("/root/copy.bin")
    assert info.size == source.stat().st_size
    assert info.mode & 0o7777 == 0o640
    target = tmp_path / "back.bin"
    sandbox.fs.download_file("/root/copy.bin", target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(source.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_upload_checks_inode(
    sandbox: SandboxInstance, channel: grpc.Channel, tmp_path: Path
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"host bytes")
    named = host_file(source)
    named.inode += 1
    with pytest.raises(grpc.RpcError) as raised:
        upload(channel, sandbox.sandbox_id, "/root/x", named)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "device and inode differ" in (raised.value.details() or "")
    with pytest.raises(NotFound):
        sandbox.fs.stat_file("/root/x")


def test_download_checks_inode(
    sandbox: SandboxInstance, channel: grpc.Channel, tmp_path: Path
) -> None:
    sandbox.fs.write_bytes("/root/y", b"sandbox bytes")
    target = tmp_path / "target.bin"
    target.write_bytes(b"keep me")
    named = host_file(target)
    named.device += 1
    stub = filesystem_pb2_grpc.FileServiceStub(channel)
    request = pb.DownloadFileRequest(
        sandbox_id=sandbox.sandbox_id, path="/root/y", host_file=named
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.DownloadFile(request, timeout=60))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize("path", ["relative/file", "/etc/shadow-link"])
def test_upload_rejects_other_paths(
    sandbox: SandboxInstance, channel: grpc.Channel, tmp_path: Path, path: str
) -> None:
    link = tmp_path / "link"
    link.symlink_to("/etc/hostname")
    named = pb.HostFile(path=path if path.startswith("relative") else str(link))
    with pytest.raises(grpc.RpcError) as raised:
        upload(channel, sandbox.sandbox_id, "/root/z", named)
    assert raised.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    )


def test_token_holder_cannot_name_host_files(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    daemon = daemon_factory("--listen", f"127.0.0.1:{port}")
    token = create_token(daemon.data_dir)
    source = Path("/etc/hostname")
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        created = stub.Create(
            sandbox_pb2.CreateRequest(), metadata=metadata, timeout=30
        )
        header = pb.UploadFileHeader(
            sandbox_id=created.sandbox.sandbox_id,
            path="/root/stolen",
            host_file=host_file(source),
        )
        requests = [
            pb.UploadFileRequest(header=header),
            pb.UploadFileRequest(end=pb.UploadFileEnd(size=0)),
        ]
        files = filesystem_pb2_grpc.FileServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            files.UploadFile(iter(requests), metadata=metadata, timeout=30)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
