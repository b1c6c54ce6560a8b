"""engine-init, the sandboxes' PID 1, run in PID namespaces of the test's own."""

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


def test_init_refuses_unless_pid_1(init_path: Path) -> None:
    # sh is PID 1 of a new PID namespace and engine-init its child, pid 2. Were
    # the check missing, its kill(-1) would reach no further than that
    # namespace.
    result = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "sh",
            "-c",
            '"$0" 3 4 5; echo "status $?"',
            str(init_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "status 2\n"
    assert "must be PID 1 of a new PID namespace, not pid 2" in result.stderr


def test_init_usage_error(init_path: Path) -> None:
    result = subprocess.run(
        ["unshare", "--pid", "--fork", str(init_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "usage: engine-init CONTROL_FD SUPERVISOR_PIDFD ZYGOTE_PIDFD" in (
        result.stderr
    )


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
