"""How FileService resolves paths: inside the sandbox, never on the host.

The file worker runs inside the sandbox, so "..", absolute symlinks and
symlinks swapped during an operation all resolve in the sandbox's own tree.
These tests check that from the host: its files are never returned and never
written.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import grpc
import pytest

from engine import Sandbox, SandboxInstance, errors
from engine.v1 import filesystem_pb2 as pb
from engine.v1 import filesystem_pb2_grpc

SENTINEL = b"sandbox-shadow-sentinel\n"
# A process in the sandbox swaps /tmp/x between a directory and a symlink to
# "/" with renameat2(RENAME_EXCHANGE), as fast as it can.
SWAPPER = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
os.mkdir("/tmp/x")
os.symlink("/", "/tmp/y")
open("/tmp/swapping", "w").close()
AT_FDCWD, RENAME_EXCHANGE = -100, 2
swaps = 0
while not os.path.exists("/tmp/stop"):
    if libc.renameat2(AT_FDCWD, b"/tmp/x", AT_FDCWD, b"/tmp/y", RENAME_EXCHANGE):
        raise OSError(ctypes.get_errno(), "renameat2 failed")
    swaps += 1
print(swaps)
"""


def run(sandbox: SandboxInstance, *argv: str) -> str:
    process = sandbox.process.exec(*argv)
    code = process.wait()
    stderr = process.stderr.read()
    assert code == 0, f"{argv!r} exited with {code}: {stderr}"
    return process.stdout.read()


def host_shadow() -> bytes:
    return Path("/etc/shadow").read_bytes()


def test_dotdot_stays_in_sandbox(sandbox: SandboxInstance) -> None:
    with pytest.raises(errors.NotFound, match="etc/shadow"):
        sandbox.fs.read_bytes("/../../etc/shadow")
    sandbox.fs.write_bytes("/etc/shadow", SENTINEL, mode=0o640)

    for path in ["/../../etc/shadow", "/tmp/../../../etc/shadow", "../../etc/shadow"]:
        data = sandbox.fs.read_bytes(path)
        assert data == SENTINEL, path
        assert data != host_shadow(), path


def test_dotdot_listing_is_sandbox_root(sandbox: SandboxInstance) -> None:
    escaped = {entry.name for entry in sandbox.fs.list_files("/../../..")}
    root = {entry.name for entry in sandbox.fs.list_files("/")}
    assert escaped == root
    marker = f"engine-root-marker-{secrets.token_hex(4)}"
    sandbox.fs.write_bytes(f"/../{marker}", b"x")
    assert marker in {entry.name for entry in sandbox.fs.list_files("/")}
    assert not os.path.lexists(f"/{marker}")


def test_symlink_to_shadow_resolves_inside(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/etc/shadow", SENTINEL)
    run(sandbox, "ln", "-s", "/etc/shadow", "/tmp/shadow-link")

    info = sandbox.fs.stat_file("/tmp/shadow-link")
    data = sandbox.fs.read_bytes("/tmp/shadow-link")

    assert info.is_symlink
    assert info.target == "/etc/shadow"
    assert data == SENTINEL
    assert data != host_shadow()


def test_symlink_to_root_resolves_inside(sandbox: SandboxInstance) -> None:
    run(sandbox, "ln", "-s", "/", "/tmp/root-link")
    marker = f"engine-link-marker-{secrets.token_hex(4)}"
    host_root_before = sorted(os.listdir("/"))

    through_link = {entry.name for entry in sandbox.fs.list_files("/tmp/root-link")}
    sandbox_root = {entry.name for entry in sandbox.fs.list_files("/")}
    sandbox.fs.write_bytes(f"/tmp/root-link/{marker}", b"through the link")

    assert through_link == sandbox_root
    assert sandbox.fs.read_bytes(f"/{marker}") == b"through the link"
    assert not os.path.lexists(f"/{marker}")
    assert sorted(os.listdir("/")) == host_root_before


def test_symlink_swap_race_stays_inside(sandbox: SandboxInstance) -> None:
    marker = f"engine-race-{secrets.token_hex(4)}"
    host_root_before = sorted(os.listdir("/"))
    host_files = {
        path: (Path(path).read_bytes(), os.stat(path).st_mtime_ns)
        for path in ("/etc/passwd", "/etc/hostname", "/etc/shadow")
    }
    swapper = sandbox.process.exec("python3", "-c", SWAPPER)
    deadline = time.monotonic() + 30
    while True:
        try:
            sandbox.fs.stat_file("/tmp/swapping")
            break
        except errors.NotFound:
            assert time.monotonic() < deadline, "the swapper did not start"
            time.sleep(0.05)

    written = 0
    for index in range(200):
        try:
            sandbox.fs.write_bytes(f"/tmp/x/{marker}", str(index).encode())
            written += 1
        except (errors.NotFound, errors.InvalidArgument):
            # /tmp/x was a symlink, or gone for an instant, at one step.
            pass
    sandbox.fs.write_bytes("/tmp/stop", b"")
    assert swapper.wait(timeout=30) == 0, swapper.stderr.read()
    swaps = int(swapper.stdout.read())

    # Far more swaps than writes: the path flipped during nearly every write.
    assert swaps > 10 * 200
    assert written > 0
    assert not os.path.lexists(f"/{marker}")
    assert sorted(os.listdir("/")) == host_root_before
    for path, (content, mtime) in host_files.items():
        assert Path(path).read_bytes() == content, path
        assert os.stat(path).st_mtime_ns == mtime, path
    # Each write landed in the sandbox: in /tmp/x while it was the directory,
    # or in the sandbox's own root while /tmp/x pointed there.
    inside = [
        path
        for path in (f"/{marker}", f"/tmp/x/{marker}", f"/tmp/y/{marker}")
        if _exists(sandbox, path)
    ]
    print(f"{swaps} swaps, {written} of 200 writes succeeded, files at {inside}")
    assert inside


def _exists(sandbox: SandboxInstance, path: str) -> bool:
    try:
        sandbox.fs.stat_file(path)
    except errors.NotFound:
        return False
    return True


@pytest.mark.parametrize(
    "operation",
    ["write", "mkdir", "delete", "chmod", "move"],
)
def test_read_only_usr_denied(sandbox: SandboxInstance, operation: str) -> None:
    calls = {
        "write": lambda: sandbox.fs.write_bytes("/usr/engine-test", b"x"),
        "mkdir": lambda: sandbox.fs.create_directory("/usr/engine-test"),
        "delete": lambda: sandbox.fs.delete_file("/usr/bin/env"),
        "chmod": lambda: sandbox.fs.chmod("/usr/bin/env", 0o777),
        "move": lambda: sandbox.fs.move("/usr/bin/env", "/usr/bin/env2"),
    }
    with pytest.raises(errors.PermissionDenied, match="/usr"):
        calls[operation]()
    assert sandbox.fs.stat_file("/usr/bin/env").type == "file"


def test_read_only_usr_status_code(
    sandbox: SandboxInstance, channel: grpc.Channel
) -> None:
    stub = filesystem_pb2_grpc.FileServiceStub(channel)
    header = pb.UploadFileHeader(sandbox_id=sandbox.sandbox_id, path="/usr/x")
    requests = [
        pb.UploadFileRequest(header=header),
        pb.UploadFileRequest(data=b"x"),
        pb.UploadFileRequest(end=pb.UploadFileEnd(size=1)),
    ]
    with pytest.raises(grpc.RpcError) as raised:
        stub.UploadFile(iter(requests))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "/usr/x" in raised.value.details()


def test_relative_paths_use_workdir(address: str) -> None:
    with Sandbox(workdir="/srv/app", address=address).create() as sandbox:
        sandbox.fs.write_text("notes.txt", "relative\n")
        sandbox.fs.create_directory("sub/dir")
        assert sandbox.fs.stat_file("/srv/app/notes.txt").size == 9
        assert sandbox.fs.stat_file("notes.txt").path == "/srv/app/notes.txt"
        assert run(sandbox, "cat", "/srv/app/notes.txt") == "relative\n"
        assert sandbox.fs.stat_file("/srv/app/sub/dir").is_dir
        names = [entry.name for entry in sandbox.fs.list_files(".")]
        assert names == ["notes.txt", "sub"]


def test_non_utf8_name_listed(sandbox: SandboxInstance, channel: grpc.Channel) -> None:
    run(sandbox, "python3", "-c", "open(b'/tmp/\\xff', 'w').write('raw')")

    entries = sandbox.fs.list_files("/tmp")
    assert [entry.name for entry in entries] == ["\udcff"]
    assert entries[0].path == "/tmp/\udcff"
    assert sandbox.fs.read_bytes(entries[0].path) == b"raw"
    assert sandbox.fs.read_bytes(b"/tmp/\xff") == b"raw"

    stub = filesystem_pb2_grpc.FileServiceStub(channel)
    request = pb.ListFilesRequest(sandbox_id=sandbox.sandbox_id, path="/tmp")
    (response,) = list(stub.ListFiles(request))
    (entry,) = response.files
    assert entry.name == "\ufffd"
    assert entry.name_raw == b"\xff"
    assert entry.path == "/tmp/\ufffd"
    assert entry.path_raw == b"/tmp/\xff"

    stat = stub.StatFile(
        pb.StatFileRequest(sandbox_id=sandbox.sandbox_id, path_raw=b"/tmp/\xff")
    )
    assert stat.file.size == 3
    assert stat.file.name_raw == b"\xff"


def test_utf8_name_has_no_raw(sandbox: SandboxInstance, channel: grpc.Channel) -> None:
    sandbox.fs.write_bytes("/tmp/grüße", b"x")
    stub = filesystem_pb2_grpc.FileServiceStub(channel)
    request = pb.ListFilesRequest(sandbox_id=sandbox.sandbox_id, path="/tmp")
    (response,) = list(stub.ListFiles(request))
    (entry,) = response.files
    assert entry.name == "grüße"
    assert entry.name_raw == b""
    assert entry.path_raw == b""


def test_non_utf8_name_written(sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes(b"/tmp/caf\xe9", b"latin-1 name")
    listing = run(sandbox, "python3", "-c", "import os; print(os.listdir(b'/tmp'))")
    assert listing == "[b'caf\\xe9']\n"
    assert sandbox.fs.read_bytes("/tmp/caf\udce9") == b"latin-1 name"
    sandbox.fs.move(b"/tmp/caf\xe9", b"/tmp/\xfe\xfd")
    assert [entry.name for entry in sandbox.fs.list_files("/tmp")] == ["\udcfe\udcfd"]
    sandbox.fs.delete_file("/tmp/\udcfe\udcfd")
    assert sandbox.fs.list_files("/tmp") == []


def test_name_length_limits(sandbox: SandboxInstance) -> None:
    longest = "/tmp/" + "a" * 255
    too_long = "/tmp/" + "b" * 256

    sandbox.fs.write_bytes(longest, b"ok")
    sandbox.fs.create_directory("/tmp/" + "d" * 255)

    assert sandbox.fs.read_bytes(longest) == b"ok"
    with pytest.raises(errors.InvalidArgument, match="File name too long"):
        sandbox.fs.write_bytes(too_long, b"no")
    with pytest.raises(errors.InvalidArgument, match="File name too long"):
        sandbox.fs.create_directory(too_long)
    with pytest.raises(errors.InvalidArgument, match="bbbbbbbb"):
        sandbox.fs.stat_file(too_long)
    names = sorted(len(entry.name) for entry in sandbox.fs.list_files("/tmp"))
    assert names == [255, 255]


def test_path_length_limit(sandbox: SandboxInstance) -> None:
    path = "/tmp/" + "/".join(["c" * 200] * 21)
    with pytest.raises(errors.InvalidArgument, match="longer than 4096 bytes"):
        sandbox.fs.stat_file(path)


def test_deep_parents_created(sandbox: SandboxInstance) -> None:
    path = "/root/" + "a/" * 1000 + "file"
    sandbox.fs.write_bytes(path, b"deep", parents=True)
    assert sandbox.fs.read_bytes(path) == b"deep"
    directory = "/tmp/" + "b/" * 1000 + "end"
    sandbox.fs.create_directory(directory, parents=True)
    assert sandbox.fs.stat_file(directory).is_dir


@pytest.mark.parametrize(
    "path",
    [
        "/proc/sys/kernel/hostname",
        "/proc/sys/net/ipv4/ip_local_port_range",
        "/proc/1/cgroup",
        "/proc/sysvipc/shm",
    ],
)
def test_proc_reads_match_sandbox_view(sandbox: SandboxInstance, path: str) -> None:
    # These files show the namespaces of the process that reads them, so a
    # worker outside the sandbox's UTS, IPC, network or cgroup namespace would
    # return the host's hostname, IPC objects, sysctls or cgroup paths.
    inside = sandbox.process.exec("cat", path)
    assert inside.wait() == 0
    expected = [line for line in inside.stdout.read().splitlines() if line]
    found = [match.text for match in sandbox.fs.find_in_files(path, ".+")]
    assert found == expected
