"""FileService errors: each status code, the value it names, and what remains.

Most checks go through the raw gRPC stub, so that they see the status code and
details the daemon sends, and bypass the checks that the SDK makes first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from engine import Sandbox, SandboxInstance, errors
from engine.sdk.client import Client
from engine.sdk.files import SandboxFileSystem
from engine.v1 import filesystem_pb2 as pb
from engine.v1 import filesystem_pb2_grpc

MIB = 1024 * 1024


@pytest.fixture
def file_stub(channel: grpc.Channel) -> filesystem_pb2_grpc.FileServiceStub:
    return filesystem_pb2_grpc.FileServiceStub(channel)


def status_of(call: Callable[[], Any]) -> grpc.RpcError:
    """Run ``call``, which must fail, and return its RpcError."""
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return raised.value


def upload_requests(
    sandbox_id: str, path: str, data: bytes = b"x", **header: Any
) -> list[pb.UploadFileRequest]:
    first = pb.UploadFileHeader(sandbox_id=sandbox_id, path=path, **header)
    return [
        pb.UploadFileRequest(header=first),
        pb.UploadFileRequest(data=data),
        pb.UploadFileRequest(end=pb.UploadFileEnd(size=len(data))),
    ]


# ---------------------------------------------------------------- NOT_FOUND


def test_missing_path_not_found(
    sandbox: SandboxInstance, file_stub: filesystem_pb2_grpc.FileServiceStub
) -> None:
    sandbox_id = sandbox.sandbox_id
    calls = {
        "StatFile": lambda: file_stub.StatFile(
            pb.StatFileRequest(sandbox_id=sandbox_id, path="/tmp/missing")
        ),
        "DownloadFile": lambda: file_stub.DownloadFile(
            pb.DownloadFileRequest(sandbox_id=sandbox_id, path="/tmp/missing")
        ),
        "DeleteFile": lambda: file_stub.DeleteFile(
            pb.DeleteFileRequest(sandbox_id=sandbox_id, path="/tmp/missing")
        ),
        "ListFiles": lambda: file_stub.ListFiles(
            pb.ListFilesRequest(sandbox_id=sandbox_id, path="/tmp/missing")
        ),
        "Chmod": lambda: file_stub.Chmod(
            pb.ChmodRequest(sandbox_id=sandbox_id, path="/tmp/missing", mode=0o600)
        ),
        "Move": lambda: file_stub.Move(
            pb.MoveRequest(
                sandbox_id=sandbox_id, source="/tmp/missing", destination="/tmp/b"
            )
        ),
    }
    for name, call in calls.items():
        error = status_of(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND, name
        assert "/tmp/missing" in error.details(), name


def test_unknown_sandbox_not_found(address: str) -> None:
    with Client(address) as client:
        fs = SandboxFileSystem(client, "sb-doesnotexist")
        with pytest.raises(errors.NotFound, match="sb-doesnotexist"):
            fs.stat_file("/tmp")
        # A relative path needs the sandbox's workdir, and still gets NotFound.
        with pytest.raises(errors.NotFound, match="sb-doesnotexist"):
            fs.stat_file("relative")
        with pytest.raises(errors.NotFound, match="sb-doesnotexist"):
            fs.write_bytes("/tmp/x", b"x")
        with pytest.raises(errors.NotFound, match="sb-doesnotexist"):
            fs.list_files("/tmp")


def test_unknown_sandbox_status(
    file_stub: filesystem_pb2_grpc.FileServiceStub,
) -> None:
    error = status_of(
        lambda: file_stub.StatFile(
            pb.StatFileRequest(sandbox_id="sb-nope", path="relative")
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "sb-nope" in error.details()
    error = status_of(
        lambda: file_stub.UploadFile(iter(upload_requests("sb-nope", "/tmp/x")))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "sb-nope" in error.details()


# ----------------------------------------------------------- ALREADY_EXISTS


def test_existing_path_already_exists(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/a", b"a")
    sandbox.fs.write_bytes("/tmp/b", b"b")
    sandbox.fs.create_directory("/tmp/dir")

    with pytest.raises(errors.AlreadyExists, match="/tmp/dir"):
        sandbox.fs.create_directory("/tmp/dir", parents=False)
    with pytest.raises(errors.AlreadyExists, match="/tmp/a"):
        sandbox.fs.create_directory("/tmp/a")
    with pytest.raises(errors.AlreadyExists, match="/tmp/b"):
        sandbox.fs.move("/tmp/a", "/tmp/b", overwrite=False)
    assert sandbox.fs.read_bytes("/tmp/a") == b"a"
    assert sandbox.fs.read_bytes("/tmp/b") == b"b"


# -------------------------------------------------------- INVALID_ARGUMENT


def test_bad_paths_invalid_argument(
    sandbox: SandboxInstance, file_stub: filesystem_pb2_grpc.FileServiceStub
) -> None:
    cases = {
        "": "path is empty",
        "/tmp/a\x00b": "NUL",
        "/" + "x" * 5000: "longer than 4096 bytes",
    }
    for path, message in cases.items():
        error = status_of(
            lambda path=path: file_stub.StatFile(
                pb.StatFileRequest(sandbox_id=sandbox.sandbox_id, path=path)
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, path[:20]
        assert message in error.details(), path[:20]
        error = status_of(
            lambda path=path: file_stub.UploadFile(
                iter(upload_requests(sandbox.sandbox_id, path))
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, path[:20]
        assert message in error.details(), path[:20]


def test_empty_sandbox_id_invalid(
    file_stub: filesystem_pb2_grpc.FileServiceStub,
) -> None:
    error = status_of(
        lambda: file_stub.StatFile(pb.StatFileRequest(sandbox_id="", path="/tmp"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sandbox_id" in error.details()


@pytest.mark.parametrize("mode", [0o10000, 0o17777, 2**32 - 1])
def test_bad_mode_invalid_argument(
    sandbox: SandboxInstance,
    file_stub: filesystem_pb2_grpc.FileServiceStub,
    mode: int,
) -> None:
    sandbox_id = sandbox.sandbox_id
    calls = [
        lambda: file_stub.UploadFile(
            iter(upload_requests(sandbox_id, "/tmp/moded", mode=mode))
        ),
        lambda: file_stub.CreateDirectory(
            pb.CreateDirectoryRequest(sandbox_id=sandbox_id, path="/tmp/d", mode=mode)
        ),
        lambda: file_stub.Chmod(
            pb.ChmodRequest(sandbox_id=sandbox_id, path="/tmp", mode=mode)
        ),
    ]
    for call in calls:
        error = status_of(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{mode:#o}" in error.details()
    assert sandbox.fs.list_files("/tmp") == []


def test_sdk_rejects_bad_mode(sandbox: SandboxInstance) -> None:
    for mode in (-1, 0o10000, True, "644"):
        with pytest.raises(errors.InvalidArgument, match="invalid mode"):
            sandbox.fs.write_bytes("/tmp/x", b"x", mode=mode)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument, match="invalid mode"):
            sandbox.fs.chmod("/tmp", mode)  # type: ignore[arg-type]


def test_chmod_without_mode_invalid(
    sandbox: SandboxInstance, file_stub: filesystem_pb2_grpc.FileServiceStub
) -> None:
    error = status_of(
        lambda: file_stub.Chmod(
            pb.ChmodRequest(sandbox_id=sandbox.sandbox_id, path="/tmp")
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing mode" in error.details()


def test_bad_regex_invalid_argument(sandbox: SandboxInstance) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"invalid pattern '\(unclosed'"):
        sandbox.fs.find_in_files("/tmp", "(unclosed")
    with pytest.raises(errors.InvalidArgument, match=r"invalid pattern '\[a-'"):
        sandbox.fs.replace_in_files("/tmp", "[a-", "x")
    with pytest.raises(errors.InvalidArgument, match="pattern is empty"):
        sandbox.fs.find_in_files("/tmp", "")
    with pytest.raises(errors.InvalidArgument, match=r"invalid replacement '\\\\2'"):
        sandbox.fs.replace_in_files("/tmp", "(a)", "\\2")
    with pytest.raises(errors.InvalidArgument, match="invalid replacement"):
        sandbox.fs.replace_in_files("/tmp", "a", "\\g<missing>")


def test_bad_max_matches_invalid(
    sandbox: SandboxInstance, file_stub: filesystem_pb2_grpc.FileServiceStub
) -> None:
    error = status_of(
        lambda: file_stub.FindInFiles(
            pb.FindInFilesRequest(
                sandbox_id=sandbox.sandbox_id,
                path="/tmp",
                pattern="a",
                max_matches=10_001,
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10001" in error.details()
    for value in (0, -1, 10_001):
        with pytest.raises(errors.InvalidArgument, match="max_matches"):
            sandbox.fs.find_in_files("/tmp", "a", max_matches=value)


def test_wrong_file_type_invalid(sandbox: SandboxInstance) -> None:
    sandbox.fs.create_directory("/tmp/dir")
    sandbox.fs.write_bytes("/tmp/file", b"x")

    with pytest.raises(errors.InvalidArgument, match=r"/tmp/dir.*delete_directory"):
        sandbox.fs.delete_file("/tmp/dir")
    with pytest.raises(errors.InvalidArgument, match="/tmp/dir"):
        sandbox.fs.read_bytes("/tmp/dir")
    with pytest.raises(errors.InvalidArgument, match="/tmp/dir"):
        sandbox.fs.write_bytes("/tmp/dir", b"x")
    with pytest.raises(errors.InvalidArgument, match="/tmp/file"):
        sandbox.fs.list_files("/tmp/file")
    with pytest.raises(errors.InvalidArgument, match="/tmp/file"):
        sandbox.fs.delete_directory("/tmp/file")
    assert sandbox.fs.stat_file("/tmp/dir").is_dir
    assert sandbox.fs.read_bytes("/tmp/file") == b"x"


def test_fifo_read_invalid(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("mkfifo", "/tmp/fifo")
    assert process.wait() == 0
    with pytest.raises(errors.InvalidArgument, match=r"/tmp/fifo.*not a regular file"):
        sandbox.fs.read_bytes("/tmp/fifo")


def test_upload_stream_order_invalid(
    sandbox: SandboxInstance, file_stub: filesystem_pb2_grpc.FileServiceStub
) -> None:
    sandbox_id = sandbox.sandbox_id
    header = pb.UploadFileHeader(sandbox_id=sandbox_id, path="/tmp/order")
    cases = {
        "data first": [pb.UploadFileRequest(data=b"x")],
        "empty stream": [],
        "second header": [
            pb.UploadFileRequest(header=header),
            pb.UploadFileRequest(data=b"x"),
            pb.UploadFileRequest(header=header),
        ],
        "no end": [
            pb.UploadFileRequest(header=header),
            pb.UploadFileRequest(data=b"x" * MIB),
        ],
        "wrong size": [
            pb.UploadFileRequest(header=header),
            pb.UploadFileRequest(data=b"x" * MIB),
            pb.UploadFileRequest(end=pb.UploadFileEnd(size=MIB + 1)),
        ],
    }
    for name, requests in cases.items():
        error = status_of(
            lambda requests=requests: file_stub.UploadFile(iter(requests))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert sandbox.fs.list_files("/tmp") == [], name


def test_invalid_utf8_request_invalid(
    sandbox: SandboxInstance, channel: grpc.Channel
) -> None:
    # Field 1 (sandbox_id) and field 2 (path) as length-delimited bytes, the
    # path with 0xFF, which is not valid UTF-8 and so not a valid proto string.
    sandbox_id = sandbox.sandbox_id.encode()
    path = b"/tmp/\xff"
    body = bytes([0x0A, len(sandbox_id)]) + sandbox_id + bytes([0x12, len(path)]) + path
    stat = channel.unary_unary(
        "/engine.v1.FileService/StatFile",
        request_serializer=None,
        response_deserializer=None,
    )
    error = status_of(lambda: stat(body))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "StatFile" in error.details()


# ------------------------------------------------------ FAILED_PRECONDITION


def test_terminated_sandbox_failed_precondition(
    address: str, file_stub: filesystem_pb2_grpc.FileServiceStub
) -> None:
    sandbox = Sandbox(address=address).create()
    sandbox.fs.write_bytes("/tmp/file", b"x")
    sandbox.terminate()
    sandbox_id = sandbox.sandbox_id
    try:
        calls = {
            "stat": lambda: sandbox.fs.stat_file("/tmp/file"),
            "read": lambda: sandbox.fs.read_bytes("/tmp/file"),
            "write": lambda: sandbox.fs.write_bytes("/tmp/file", b"y"),
            "list": lambda: sandbox.fs.list_files("/tmp"),
            "find": lambda: sandbox.fs.find_in_files("/tmp", "x"),
        }
        for call in calls.values():
            with pytest.raises(errors.FailedPrecondition, match=sandbox_id):
                call()
        error = status_of(
            lambda: file_stub.StatFile(
                pb.StatFileRequest(sandbox_id=sandbox_id, path="/tmp/file")
            )
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "terminated" in error.details()
    finally:
        sandbox.close()


def test_non_empty_directory_failed_precondition(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/dir/file", b"x", parents=True)
    with pytest.raises(errors.FailedPrecondition, match=r"/tmp/dir.*recursive=True"):
        sandbox.fs.delete_directory("/tmp/dir")
    assert sandbox.fs.read_bytes("/tmp/dir/file") == b"x"
    with pytest.raises(errors.FailedPrecondition, match="root"):
        sandbox.fs.delete_directory("/", recursive=True)


# ------------------------------------------------------- RESOURCE_EXHAUSTED


def test_full_tmp_resource_exhausted(address: str) -> None:
    with Sandbox(memory=32, address=address).create() as sandbox:
        with pytest.raises(errors.ResourceExhausted, match="/tmp/big"):
            sandbox.fs.write_bytes("/tmp/big", os.urandom(64 * MIB))

        assert sandbox.fs.list_files("/tmp") == []
        # The sandbox survives: PID 1 was not the process the OOM killer chose.
        process = sandbox.process.exec("sh", "-c", "echo alive; ls -A /tmp")
        assert process.wait() == 0
        assert process.stdout.read() == "alive\n"
        sandbox.fs.write_bytes("/tmp/small", b"fits")
        assert sandbox.fs.read_bytes("/tmp/small") == b"fits"
        with pytest.raises(errors.ResourceExhausted, match="/tmp/big"):
            sandbox.fs.write_bytes("/tmp/big", os.urandom(64 * MIB))
        assert [entry.name for entry in sandbox.fs.list_files("/tmp")] == ["small"]


def test_full_tmp_status_code(address: str, channel: grpc.Channel) -> None:
    stub = filesystem_pb2_grpc.FileServiceStub(channel)
    with Sandbox(memory=32, address=address).create() as sandbox:
        chunk = os.urandom(MIB)
        header = pb.UploadFileHeader(sandbox_id=sandbox.sandbox_id, path="/tmp/big")
        requests = [pb.UploadFileRequest(header=header)]
        requests += [pb.UploadFileRequest(data=chunk) for _ in range(64)]
        requests.append(pb.UploadFileRequest(end=pb.UploadFileEnd(size=64 * MIB)))
        error = status_of(lambda: stub.UploadFile(iter(requests)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "/tmp/big" in error.details()
        # /tmp is a tmpfs of half the memory limit, so it fills up before the
        # sandbox's memory does.
        assert "No space left on device" in error.details()
        assert sandbox.fs.list_files("/tmp") == []
