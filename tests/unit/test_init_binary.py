"""engine-init, each sandbox's supervisor and PID 1, started by the test."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
from pathlib import Path

import pytest

from engine.runtime import initbin


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


def test_sealed_data_is_read_only_and_never_executable() -> None:
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
