"""Resource limits and timeouts of sandboxes, enforced by the real kernel.

Memory, pids and CPU limits come from the sandbox's cgroups, nofile and core
from rlimits that PID 1 sets before each execve, and exec timeouts from the
Engine, which kills the process group of a process that runs too long.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.core.engine import HELPER_PIDS
from engine.core.models import ExitReason, SandboxSpec, SandboxState, SandboxStats
from engine.errors import ResourceExhausted

if TYPE_CHECKING:
    from conftest import EngineRunner

ALLOCATE_200_MIB = "data = bytearray(b'x') * (200 << 20)\nprint(len(data))"

FORK_UNTIL_FAILURE = """
import os, signal
children = []
error = 0
while len(children) < 1000:
    try:
        pid = os.fork()
    except OSError as failure:
        error = failure.errno
        break
    if pid == 0:
        os.pause()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
print(error, len(children))
"""

SPIN_TWO_SECONDS = """
import time
end = time.monotonic() + 2.0
while time.monotonic() < end:
    pass
"""

LIST_COMMANDS = """
import json, os
commands = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                commands.append(file.read().replace(b"\\0", b" ").decode().strip())
        except OSError:
            pass
print(json.dumps(commands))
"""


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _pids_in_namespace(namespace: str) -> list[int]:
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and _pid_namespace(int(entry)) == namespace
    ]


def _host_healthy() -> bool:
    return subprocess.run(["true"], timeout=10).returncode == 0


# Memory.


def test_memory_limit_oom_kills(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox(memory_mib=64)
    result = engine.python(sandbox_id, ALLOCATE_200_MIB)
    assert result.exit_code == 137
    assert result.info.reason == ExitReason.OOM
    assert result.info.signal == "SIGKILL"
    assert result.stdout == b""
    after = engine.run(sandbox_id, ["echo", "alive"])
    assert after.exit_code == 0
    assert after.stdout == b"alive\n"
    assert engine.state(sandbox_id) == SandboxState.RUNNING


def test_memory_below_limit_succeeds(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox(memory_mib=512)
    result = engine.python(sandbox_id, ALLOCATE_200_MIB)
    assert result.exit_code == 0, result.stderr
    assert result.info.reason == ExitReason.EXITED
    assert result.stdout == f"{200 << 20}\n".encode()


# Pids.

FORK_FOREVER = """
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
    except OSError:
        time.sleep(0.001)
"""


def test_fork_loop_hits_pids_limit(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox(pids=64)
    result = engine.python(sandbox_id, FORK_UNTIL_FAILURE)
    assert result.exit_code == 0, result.stderr
    error, forked = (int(field) for field in result.stdout.split())
    assert error == errno.EAGAIN
    # The python process counts too, and so does the unused file worker slot.
    assert 60 <= forked <= 64
    after = engine.run(sandbox_id, ["echo", "alive"])
    assert after.exit_code == 0
    assert after.stdout == b"alive\n"
    assert _host_healthy()


def test_exec_at_pids_limit_names_limit(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox(pids=20)
    # Keeps every pid of the sandbox in use, retrying each failed fork.
    engine.exec(sandbox_id, ["python3", "-c", FORK_FOREVER])

    def full() -> bool:
        try:
            engine.exec(sandbox_id, ["true"])
        except ResourceExhausted as error:
            errors.append(str(error))
            return True
        return False

    errors: list[str] = []
    engine.wait_until(full, "the sandbox's pids to be used up")
    assert "maximum of 20 processes" in errors[0]
    assert "larger pids limit" in errors[0]


def test_fork_bomb_contained_and_cleaned(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    # A CPU limit keeps the bomb from starving the rest of the machine.
    sandbox_id = new_sandbox(pids=64, cpu=0.5)
    engine.exec(sandbox_id, ["sh", "-c", "bomb() { bomb | bomb & }; bomb"])
    time.sleep(1.0)
    stats = engine.call(engine.engine.stats(sandbox_id))
    assert stats.pids <= 64 + HELPER_PIDS
    host_pids = engine.host_pids(sandbox_id)
    own_namespace = _pid_namespace(os.getpid())
    namespaces = {_pid_namespace(pid) for pid in host_pids} - {None, own_namespace}
    assert len(namespaces) == 1
    namespace = namespaces.pop()
    assert namespace is not None

    other = new_sandbox()
    healthy = engine.run(other, ["echo", "alive"])
    assert healthy.exit_code == 0
    assert _host_healthy()

    group = engine.engine.sandboxes[sandbox_id].cgroup
    assert group is not None
    group_dirs = [os.path.dirname(path) for path in group.procs_files()]
    engine.terminate(sandbox_id)
    assert _pids_in_namespace(namespace) == []
    assert [d for d in group_dirs if os.path.exists(d)] == []
    assert [pid for pid in host_pids if engine.pid_alive(pid)] == []


# CPU.


async def _spin_and_measure(runner: EngineRunner, sandbox_id: str) -> SandboxStats:
    info = await runner.engine.exec(
        sandbox_id, ["python3", "-c", SPIN_TWO_SECONDS], timeout=30
    )
    final = await runner.engine.wait(sandbox_id, info.pid)
    assert final.exit_code == 0
    return await runner.engine.stats(sandbox_id)


def test_cpu_quota_limits_usage(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    limited = new_sandbox(cpu=0.25)
    unlimited = new_sandbox(cpu=None)

    async def measure_both() -> list[SandboxStats]:
        return await asyncio.gather(
            _spin_and_measure(engine, limited), _spin_and_measure(engine, unlimited)
        )

    limited_stats, unlimited_stats = engine.call(measure_both())
    # 0.25 cores for 2 s of wall time is 0.5 s of CPU time, plus start-up.
    assert limited_stats.cpu_seconds < 0.8
    assert unlimited_stats.cpu_seconds > 1.2


# Rlimits.


def test_nofile_rlimit_applied(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox(nofile=256)
    result = engine.run(sandbox_id, ["sh", "-c", "ulimit -n; ulimit -Hn"])
    assert result.exit_code == 0
    soft, hard = result.text.split()
    assert soft == "256"
    assert hard == "256"


def test_default_nofile_rlimit(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["sh", "-c", "ulimit -n"])
    assert result.text.strip() == str(SandboxSpec().nofile)


def test_core_rlimit_zero(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["sh", "-c", "ulimit -c; ulimit -Hc"])
    assert result.exit_code == 0
    soft, hard = result.text.split()
    assert soft == "0"
    assert hard == "0"


# Stats.


def test_stats_report_usage(engine: EngineRunner, sandbox_id: str) -> None:
    process = engine.exec(sandbox_id, ["sleep", "30"])
    stats = engine.call(engine.engine.stats(sandbox_id))
    engine.call(engine.engine.kill(sandbox_id, process.pid))
    assert stats.memory_bytes > 0
    assert stats.memory_peak_bytes >= stats.memory_bytes
    assert stats.pids >= 1
    assert stats.cpu_seconds >= 0.0


# Timeouts.


def test_timeout_kills_process_group(engine: EngineRunner, sandbox_id: str) -> None:
    process = engine.exec(sandbox_id, ["sh", "-c", "sleep 100 & sleep 100"], timeout=1)
    info = engine.wait(sandbox_id, process.pid, timeout=10)
    assert info.reason == ExitReason.TIMEOUT
    assert info.exit_code == 137
    assert info.signal == "SIGKILL"
    assert info.ended_at is not None
    elapsed = info.ended_at - info.started_at
    assert elapsed >= 0.9
    assert elapsed < 2.0
    listing = engine.python(sandbox_id, LIST_COMMANDS)
    commands = json.loads(listing.stdout)
    assert [command for command in commands if "sleep" in command] == []


def test_process_within_timeout_exits(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["sh", "-c", "sleep 0.1; exit 7"], timeout=10)
    assert result.exit_code == 7
    assert result.info.reason == ExitReason.EXITED
