"""engine-init, each sandbox's supervisor and PID 1, started by the test."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.runtime import initbin, namespaces, protocol


@pytest.fixture(scope="module")
def init_path() -> Path:
    return initbin.build()


def test_init_usage_error(init_path: Path) -> None:
    result = subprocess.run(
        [str(init_path), "extra"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "the zygote starts it with CONTROL_FD" in result.stderr


def test_init_needs_its_environment(init_path: Path) -> None:
    result = subprocess.run(
        [str(init_path)],
        env={},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid CGROUP_FDS (unset)" in result.stderr


def _run_supervisor(init_path: Path, first_fd: int) -> subprocess.CompletedProcess[str]:
    """Run engine-init with descriptors first_fd to first_fd + 4, none of them open."""
    env = {
        "CGROUP_FDS": str(first_fd + 4),
        "ZYGOTE_PID": str(os.getpid()),
        "CONTROL_FD": str(first_fd),
        "NOTIFY_FD": str(first_fd + 1),
        "WAIT_FD": str(first_fd + 2),
        "SECCOMP_FD": str(first_fd + 3),
        "OWNER_UID": "-1",
        "KEEP_CAPS": "0",
    }
    return subprocess.run(
        [str(init_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_init_rejects_a_descriptor_below_3(init_path: Path) -> None:
    result = _run_supervisor(init_path, 1)
    assert result.returncode == 2
    assert "invalid CONTROL_FD 1" in result.stderr


def test_init_rejects_a_closed_descriptor(init_path: Path) -> None:
    # It fails before it joins any cgroup or namespace.
    result = _run_supervisor(init_path, 40)
    assert result.returncode == 2
    assert "descriptor 40: Bad file descriptor" in result.stderr


def test_memfd_sealed_and_execute_only(init_path: Path) -> None:
    fd = initbin.sealed_memfd(init_path)
    try:
        info = os.fstat(fd)
        assert stat.S_IMODE(info.st_mode) == 0o111
        assert info.st_uid == 0
        assert info.st_size == init_path.stat().st_size
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & initbin.F_SEAL_ALL == initbin.F_SEAL_ALL
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


def test_sealed_data_read_only() -> None:
    fd = initbin.sealed_data("test-data", b"program", 0o400)
    try:
        info = os.fstat(fd)
        assert stat.S_IMODE(info.st_mode) == 0o400
        assert os.pread(fd, 16, 0) == b"program"
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & initbin.F_SEAL_ALL == initbin.F_SEAL_ALL
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
        with pytest.raises(PermissionError):
            os.fchmod(fd, 0o500)
    finally:
        os.close(fd)


def _start_message(*strings: bytes) -> bytes:
    header = protocol.INIT_HEADER.pack(protocol.INIT_MAGIC, protocol.INIT_START, 0, 0)
    return header + b"".join(text + b"\0" for text in strings)


REQUIRED = (b"hostname=sb", b"root=/r", b"lower=/l", b"upper=/u", b"work=/w")

# A START message that the supervisor must reject, and the words of its reply.
MALFORMED_STARTS = {
    "short header": (bytes([protocol.INIT_MAGIC, protocol.INIT_START]), "shorter"),
    "other op": (
        protocol.INIT_HEADER.pack(protocol.INIT_MAGIC, protocol.INIT_EXEC, 0, 0),
        "no START message",
    ),
    "no equals sign": (_start_message(b"hostname"), "not of the form key=value"),
    "no final NUL": (_start_message(*REQUIRED)[:-1], "not of the form key=value"),
    "unknown key": (_start_message(b"colour=red"), "unknown key"),
    "size not a number": (_start_message(b"tmp_size=-1"), "not a number"),
    "size overflow": (
        _start_message(b"tmp_size=99999999999999999999999"),
        "not a number",
    ),
    "bind without target": (_start_message(b"bind=/usr"), "lacks its target"),
    "too many binds": (
        _start_message(*REQUIRED, *[b"bind=/usr", b"/usr"] * 65),
        "too many binds",
    ),
    "no workdir": (_start_message(*REQUIRED), "lacks a required field"),
}


@contextlib.contextmanager
def _supervisor(init_path: Path) -> Iterator[tuple[subprocess.Popen, socket.socket]]:
    """Start engine-init as a supervisor that waits for its START message.

    The test takes the zygote's part: it writes the id maps when the
    supervisor has created its user namespace. The supervisor joins the
    test's own cgroup, which moves nothing.
    """
    ours, theirs = protocol.socketpair()
    notify_read, notify_write = os.pipe2(os.O_CLOEXEC)
    wait_read, wait_write = os.pipe2(os.O_CLOEXEC)
    program = initbin.sealed_data("test-seccomp", b"\0" * 8, 0o400)
    cgroup = os.open(_own_cgroup_procs(), os.O_WRONLY | os.O_CLOEXEC)
    passed = (theirs.fileno(), notify_write, wait_read, program, cgroup)
    env = {
        "CONTROL_FD": str(theirs.fileno()),
        "NOTIFY_FD": str(notify_write),
        "WAIT_FD": str(wait_read),
        "SECCOMP_FD": str(program),
        "CGROUP_FDS": str(cgroup),
        "ZYGOTE_PID": str(os.getpid()),
        "OWNER_UID": "-1",
        "KEEP_CAPS": "0",
    }
    process = subprocess.Popen([str(init_path)], env=env, pass_fds=passed)
    try:
        theirs.close()
        for fd in passed[1:]:
            os.close(fd)
        assert os.read(notify_read, 1) == b"u"
        namespaces.write_id_maps(process.pid, 100000, 65536)
        os.write(wait_write, b"g")
        yield process, ours
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for fd in (notify_read, wait_write):
            os.close(fd)
        ours.close()


@pytest.mark.parametrize("case", sorted(MALFORMED_STARTS))
def test_supervisor_rejects_malformed_start(init_path: Path, case: str) -> None:
    data, expected = MALFORMED_STARTS[case]
    with _supervisor(init_path) as (process, control):
        protocol.send_raw(control, data)
        received = protocol.recv(control)
        status = process.wait(30)
    assert received is not None
    message, _ = received
    assert message["op"] == "failed"
    assert "the sandbox's spec is malformed" in message["message"]
    assert expected in message["message"]
    assert status == 1


def test_supervisor_exits_when_socket_closes(init_path: Path) -> None:
    # The Engine closes an unused supervisor's socket when it discards the slot.
    with _supervisor(init_path) as (process, control):
        control.close()
        status = process.wait(30)
    assert status == 0


def _own_cgroup_procs() -> str:
    """Return the cgroup.procs file of this process's pids (v1) or v2 cgroup."""
    with open("/proc/self/cgroup") as table:
        lines = [line.strip().split(":", 2) for line in table]
    for _, controllers, path in lines:
        if "pids" in controllers.split(","):
            return f"/sys/fs/cgroup/pids{path}/cgroup.procs"
    for hierarchy, _, path in lines:
        if hierarchy == "0":
            return f"/sys/fs/cgroup{path}/cgroup.procs"
    raise AssertionError("this process is in no pids cgroup and no v2 cgroup")
