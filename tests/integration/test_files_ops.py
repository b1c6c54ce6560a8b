"""Metadata, directories, moves, search and replace through ``sb.fs``."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine import FileInfo, Match, Sandbox, SandboxInstance, errors
from engine.core.models import SandboxState
from engine.v1 import filesystem_pb2 as pb
from engine.v1 import filesystem_pb2_grpc

STAT = (
    "import json, os, sys; s = os.stat(sys.argv[1]);"
    " print(json.dumps([s.st_ino, s.st_mtime_ns, s.st_mode & 0o7777, s.st_uid,"
    " s.st_gid]))"
)


def run(sandbox: SandboxInstance, *argv: str) -> str:
    process = sandbox.process.exec(*argv)
    code = process.wait()
    stderr = process.stderr.read()
    assert code == 0, f"{argv!r} exited with {code}: {stderr}"
    return process.stdout.read()


def inside_stat(sandbox: SandboxInstance, path: str) -> list[int]:
    """Return [inode, mtime_ns, mode, uid, gid] of ``path`` as the sandbox sees it."""
    return json.loads(run(sandbox, "python3", "-c", STAT, path))


# ----------------------------------------------------------------- metadata


def test_stat_file_fields(sandbox: SandboxInstance) -> None:
    before = time.time()
    sandbox.fs.write_bytes("/tmp/file", b"12345", mode=0o640)
    run(sandbox, "chown", "1000:2000", "/tmp/file")

    info = sandbox.fs.stat_file("/tmp/file")

    assert isinstance(info, FileInfo)
    assert info.path == "/tmp/file"
    assert info.name == "file"
    assert info.size == 5
    assert info.mode == 0o640
    assert info.type == "file"
    assert info.uid == 1000
    assert info.gid == 2000
    assert before - 5 <= info.mtime <= time.time() + 5
    assert info.target == ""
    assert not info.is_dir
    assert not info.is_symlink


def test_stat_symlink_and_directory(sandbox: SandboxInstance) -> None:
    sandbox.fs.create_directory("/tmp/dir", mode=0o750)
    run(sandbox, "ln", "-s", "dir", "/tmp/link")

    link = sandbox.fs.stat_file("/tmp/link")
    directory = sandbox.fs.stat_file("/tmp/dir")

    assert link.is_symlink
    assert link.type == "symlink"
    assert link.target == "dir"
    assert link.size == 3
    assert directory.is_dir
    assert directory.mode == 0o750
    assert directory.uid == 0


def test_list_files_sorted(sandbox: SandboxInstance) -> None:
    for name in ("b", "a", "c"):
        sandbox.fs.write_bytes(f"/tmp/{name}", name.encode())
    sandbox.fs.create_directory("/tmp/d")

    entries = sandbox.fs.list_files("/tmp")

    assert [entry.name for entry in entries] == ["a", "b", "c", "d"]
    assert [entry.type for entry in entries] == ["file", "file", "file", "dir"]
    assert entries.truncated is False


def test_list_files_recursive(sandbox: SandboxInstance) -> None:
    for path in ("/tmp/t/a/1", "/tmp/t/a/2", "/tmp/t/b/3", "/tmp/t/top"):
        sandbox.fs.write_bytes(path, b"x", parents=True)
    sandbox.fs.write_bytes("/tmp/outside/secret", b"x", parents=True)
    run(sandbox, "ln", "-s", "/tmp/outside", "/tmp/t/link")

    entries = sandbox.fs.list_files("/tmp/t", recursive=True)
    shallow = sandbox.fs.list_files("/tmp/t")

    assert [entry.path for entry in entries] == [
        "/tmp/t/a",
        "/tmp/t/a/1",
        "/tmp/t/a/2",
        "/tmp/t/b",
        "/tmp/t/b/3",
        "/tmp/t/link",
        "/tmp/t/top",
    ]
    assert [entry.name for entry in shallow] == ["a", "b", "link", "top"]
    assert entries.truncated is False


def test_list_many_entries_batched(sandbox: SandboxInstance) -> None:
    script = "import os\nfor i in range(2500): open(f'/tmp/many/{i:05}', 'w')"
    run(sandbox, "mkdir", "/tmp/many")
    run(sandbox, "python3", "-c", script)

    entries = sandbox.fs.list_files("/tmp/many")

    assert len(entries) == 2500
    assert entries[0].name == "00000"
    assert entries[-1].name == "02499"
    assert entries.truncated is False


# -------------------------------------------------------------- directories


def test_create_directory_modes(sandbox: SandboxInstance) -> None:
    created = sandbox.fs.create_directory("/tmp/a/b/c", mode=0o700)

    assert created.mode == 0o700
    assert created.is_dir
    assert sandbox.fs.stat_file("/tmp/a").mode == 0o755
    assert sandbox.fs.stat_file("/tmp/a/b").mode == 0o755
    assert inside_stat(sandbox, "/tmp/a/b/c")[2] == 0o700
    sticky = sandbox.fs.create_directory("/tmp/shared", mode=0o1777, parents=False)
    assert sticky.mode == 0o1777


def test_create_existing_directory_unchanged(sandbox: SandboxInstance) -> None:
    sandbox.fs.create_directory("/tmp/kept", mode=0o700)

    again = sandbox.fs.create_directory("/tmp/kept", mode=0o777)
    tmp = sandbox.fs.create_directory("/tmp")

    assert again.mode == 0o700
    assert tmp.mode == 0o1777
    with pytest.raises(errors.NotFound, match="/tmp/missing/child"):
        sandbox.fs.create_directory("/tmp/missing/child", parents=False)


def test_delete_directory_recursive(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/keep/precious", b"keep", parents=True)
    sandbox.fs.write_bytes("/tmp/tree/a/b/file", b"x", parents=True)
    run(sandbox, "ln", "-s", "/tmp/keep", "/tmp/tree/a/link")

    sandbox.fs.delete_directory("/tmp/tree", recursive=True)

    assert [entry.name for entry in sandbox.fs.list_files("/tmp")] == ["keep"]
    assert sandbox.fs.read_bytes("/tmp/keep/precious") == b"keep"


def test_delete_empty_directory(sandbox: SandboxInstance) -> None:
    sandbox.fs.create_directory("/tmp/empty")
    sandbox.fs.delete_directory("/tmp/empty")
    with pytest.raises(errors.NotFound, match="/tmp/empty"):
        sandbox.fs.stat_file("/tmp/empty")


def test_delete_file_keeps_link_target(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/target", b"t")
    run(sandbox, "ln", "-s", "/tmp/target", "/tmp/link")

    sandbox.fs.delete_file("/tmp/link")

    assert sandbox.fs.read_bytes("/tmp/target") == b"t"
    assert [entry.name for entry in sandbox.fs.list_files("/tmp")] == ["target"]


def test_move_file_and_directory(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/src", b"moved", mode=0o600)
    sandbox.fs.write_bytes("/tmp/dir/inner", b"inner", parents=True)
    sandbox.fs.write_bytes("/tmp/old", b"old")

    moved = sandbox.fs.move("/tmp/src", "/tmp/old")
    sandbox.fs.move("/tmp/dir", "/tmp/renamed")

    assert moved.path == "/tmp/old"
    assert moved.mode == 0o600
    assert sandbox.fs.read_bytes("/tmp/old") == b"moved"
    assert sandbox.fs.read_bytes("/tmp/renamed/inner") == b"inner"
    names = [entry.name for entry in sandbox.fs.list_files("/tmp")]
    assert names == ["old", "renamed"]


def test_chmod_exact(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/file", b"x")
    for mode in (0o640, 0o4755, 0o2750, 0o000, 0o7777):
        info = sandbox.fs.chmod("/tmp/file", mode)
        assert info.mode == mode
        assert inside_stat(sandbox, "/tmp/file")[2] == mode


# ------------------------------------------------------------------- search


def test_find_in_files_matches(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_text(
        "/tmp/src/a.py", "import os\nvalue = 1\nos.getcwd()\n", parents=True
    )
    sandbox.fs.write_text("/tmp/src/sub/b.py", "x = 'os'\n", parents=True)
    sandbox.fs.write_bytes("/tmp/src/binary", b"os\0os\nos\n")

    matches = sandbox.fs.find_in_files("/tmp/src", r"\bos\b")

    assert all(isinstance(match, Match) for match in matches)
    assert [(m.path, m.line, m.column, m.text) for m in matches] == [
        ("/tmp/src/a.py", 1, 8, "import os"),
        ("/tmp/src/a.py", 3, 1, "os.getcwd()"),
        ("/tmp/src/sub/b.py", 1, 6, "x = 'os'"),
    ]
    assert matches.truncated is False


def test_find_in_one_file(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_text("/tmp/notes", "alpha\nbeta\nalphabet\n")
    matches = sandbox.fs.find_in_files("/tmp/notes", "^alpha")
    assert [match.line for match in matches] == [1, 3]


def test_find_in_files_truncated(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_text("/tmp/many", "hit\n" * 50)

    limited = sandbox.fs.find_in_files("/tmp/many", "hit", max_matches=5)
    complete = sandbox.fs.find_in_files("/tmp/many", "hit")

    assert len(limited) == 5
    assert limited.truncated is True
    assert len(complete) == 50
    assert complete.truncated is False


def test_find_in_files_default_cap(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_text("/tmp/huge", "x\n" * 12_000)
    matches = sandbox.fs.find_in_files("/tmp/huge", "x")
    assert len(matches) == 10_000
    assert matches.truncated is True


def test_find_long_line_excerpt(sandbox: SandboxInstance) -> None:
    line = "a" * 5000 + "NEEDLE" + "b" * 5000
    sandbox.fs.write_text("/tmp/long", line + "\n")

    (match,) = sandbox.fs.find_in_files("/tmp/long", "NEEDLE")

    assert match.column == 5001
    assert len(match.text.encode()) == 512
    assert "NEEDLE" in match.text


def test_replace_only_matching_files(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_text("/tmp/proj/match.txt", "hello world\n", parents=True)
    sandbox.fs.write_text("/tmp/proj/other.txt", "nothing here\n", mode=0o600)
    run(sandbox, "chown", "1000:1001", "/tmp/proj/match.txt")
    run(sandbox, "chmod", "0751", "/tmp/proj/match.txt")
    unmatched_before = inside_stat(sandbox, "/tmp/proj/other.txt")
    matched_before = inside_stat(sandbox, "/tmp/proj/match.txt")
    time.sleep(0.05)

    changed = sandbox.fs.replace_in_files("/tmp/proj", r"world", "there")

    assert changed == ["/tmp/proj/match.txt"]
    assert sandbox.fs.read_text("/tmp/proj/match.txt") == "hello there\n"
    assert sandbox.fs.read_text("/tmp/proj/other.txt") == "nothing here\n"
    unmatched_after = inside_stat(sandbox, "/tmp/proj/other.txt")
    assert unmatched_after[0] == unmatched_before[0], "inode changed"
    assert unmatched_after[1] == unmatched_before[1], "mtime changed"
    matched_after = inside_stat(sandbox, "/tmp/proj/match.txt")
    assert matched_after[2] == 0o751
    assert matched_after[3] == 1000
    assert matched_after[4] == 1001
    assert matched_after[2:] == matched_before[2:]
    names = [entry.name for entry in sandbox.fs.list_files("/tmp/proj")]
    assert names == ["match.txt", "other.txt"]


def test_replace_with_groups(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_text("/tmp/conf", "port=80\nhost=a\nport=443\n")
    changed = sandbox.fs.replace_in_files(
        "/tmp/conf", r"(?m)^port=(\d+)$", r"port=\g<1>0"
    )
    assert changed == ["/tmp/conf"]
    assert sandbox.fs.read_text("/tmp/conf") == "port=800\nhost=a\nport=4430\n"


def test_replace_no_match_changes_nothing(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_text("/tmp/a", "abc\n")
    before = inside_stat(sandbox, "/tmp/a")
    assert sandbox.fs.replace_in_files("/tmp", "zzz", "y") == []
    assert inside_stat(sandbox, "/tmp/a") == before


def test_replace_skips_binary(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/bin", b"\0abc")
    sandbox.fs.write_bytes("/tmp/txt", b"abc")
    assert sandbox.fs.replace_in_files("/tmp", "abc", "xyz") == ["/tmp/txt"]
    assert sandbox.fs.read_bytes("/tmp/bin") == b"\0abc"


# ----------------------------------------------------------- TTL and service


def test_file_operations_keep_sandbox_alive(address: str) -> None:
    with Sandbox(ttl=2, address=address).create() as sandbox:
        first = sandbox.status().last_activity_at
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            sandbox.fs.stat_file("/tmp")
            time.sleep(0.5)
        info = sandbox.status()
        assert info.state == SandboxState.RUNNING
        assert info.last_activity_at > first


def test_slow_upload_keeps_sandbox_alive(address: str) -> None:
    class Slow:
        """A file object that returns 1 KiB every 0.25 s for 5 s."""

        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 20:
                return b""
            time.sleep(0.25)
            return b"x" * 1024

    with Sandbox(ttl=2, address=address).create() as sandbox:
        sandbox.fs.upload_fileobj(Slow(), "/tmp/slow")  # type: ignore[arg-type]
        assert sandbox.status().state == SandboxState.RUNNING
        assert sandbox.fs.stat_file("/tmp/slow").size == 20 * 1024


def test_idle_sandbox_still_expires(address: str) -> None:
    with Sandbox(ttl=1, address=address).create() as sandbox:
        sandbox.fs.write_bytes("/tmp/x", b"x")
        deadline = time.monotonic() + 10
        while sandbox.status().state == SandboxState.RUNNING:
            assert time.monotonic() < deadline, "the idle sandbox did not expire"
            time.sleep(0.2)
        with pytest.raises(errors.FailedPrecondition, match="ttl"):
            sandbox.fs.stat_file("/tmp/x")


def test_service_in_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="engine.v1.FileService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(reflection.ServerReflectionInfo(iter([request])))
    names = {service.name for service in response.list_services_response.service}
    assert "engine.v1.FileService" in names


def test_raw_stat_response(sandbox: SandboxInstance, channel: grpc.Channel) -> None:
    sandbox.fs.write_bytes("/tmp/file", b"abc", mode=0o640)
    stub = filesystem_pb2_grpc.FileServiceStub(channel)
    reply = stub.StatFile(
        pb.StatFileRequest(sandbox_id=sandbox.sandbox_id, path="/tmp/file")
    )
    assert reply.file.mode == 416
    assert reply.file.type == pb.FILE_TYPE_FILE
    assert reply.file.size == 3
    assert reply.file.mtime.seconds > 0
