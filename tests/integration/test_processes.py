"""Sandbox processes through the embedded Engine: output, stdin, signals, lifetime.

Output tests compare bytes exactly. Each stream keeps at most
DEFAULT_OUTPUT_BUFFER_BYTES (8 MiB), so a reader that starts after 20 MiB
were written gets a first chunk whose ``dropped`` count is 12 MiB.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from engine.core.models import (
    DEFAULT_OUTPUT_BUFFER_BYTES,
    ExitReason,
    OutputChunk,
    ProcessState,
    SandboxState,
    Stream,
    TerminationReason,
)
from engine.errors import FailedPrecondition, NotFound

if TYPE_CHECKING:
    from conftest import EngineRunner

MIB = 1024 * 1024
# `seq 1 3000000` prints about 22.9 MB, more than LARGE_OUTPUT_BYTES.
SEQ_COUNT = 3_000_000
LARGE_OUTPUT_BYTES = 20 * MIB


@functools.cache
def _seq_output() -> bytes:
    """Return the output of `seq 1 SEQ_COUNT`."""
    return ("\n".join(map(str, range(1, SEQ_COUNT + 1))) + "\n").encode()


def _seq_bytes(size: int) -> bytes:
    data = _seq_output()
    assert len(data) >= size
    return data[:size]


def _check_chunks_match(chunks: list[OutputChunk], expected: bytes) -> None:
    """Assert each chunk's bytes are those of ``expected`` at its offset."""
    for chunk in chunks:
        assert chunk.data == expected[chunk.offset : chunk.offset + len(chunk.data)]


# Output.


def test_binary_stdout_stderr_exact(engine: EngineRunner, sandbox_id: str) -> None:
    stdout = bytes(range(256)) * 4096
    stderr = bytes(reversed(range(256))) * 64
    result = engine.python(
        sandbox_id,
        "import sys\n"
        "sys.stdout.buffer.write(bytes(range(256)) * 4096)\n"
        "sys.stderr.buffer.write(bytes(reversed(range(256))) * 64)",
    )
    assert result.exit_code == 0
    assert result.stdout == stdout
    assert result.stderr == stderr


def test_output_under_cap_complete(engine: EngineRunner, sandbox_id: str) -> None:
    size = 6 * MIB
    assert size < DEFAULT_OUTPUT_BUFFER_BYTES
    process = engine.exec(
        sandbox_id, ["sh", "-c", f"seq 1 {SEQ_COUNT} | head -c {size}"]
    )
    info = engine.wait(sandbox_id, process.pid, timeout=30)
    assert info.exit_code == 0
    chunks = engine.chunks(sandbox_id, process.pid)
    assert chunks[0].dropped == 0
    assert chunks[0].offset == 0
    assert b"".join(chunk.data for chunk in chunks) == _seq_bytes(size)


def test_large_output_late_reader_dropped(
    engine: EngineRunner, sandbox_id: str
) -> None:
    expected = _seq_bytes(LARGE_OUTPUT_BYTES)

    async def follow_then_read_late() -> tuple[list[OutputChunk], list[OutputChunk]]:
        process = await engine.engine.exec(
            sandbox_id,
            ["sh", "-c", f"seq 1 {SEQ_COUNT} | head -c {LARGE_OUTPUT_BYTES}"],
        )
        live = await engine.chunks_async(sandbox_id, process.pid)
        info = await engine.engine.wait(sandbox_id, process.pid)
        assert info.exit_code == 0
        late = await engine.chunks_async(sandbox_id, process.pid)
        return live, late

    live, late = engine.call(follow_then_read_late())
    dropped = LARGE_OUTPUT_BYTES - DEFAULT_OUTPUT_BUFFER_BYTES
    assert late[0].dropped == dropped
    assert late[0].offset == dropped
    assert sum(chunk.dropped for chunk in late) == dropped
    assert b"".join(chunk.data for chunk in late) == expected[dropped:]
    # A live reader may fall behind and miss bytes, but every byte it gets is
    # at the right offset, and received plus dropped bytes cover the stream.
    _check_chunks_match(live, expected)
    received = sum(len(chunk.data) for chunk in live)
    assert received + sum(chunk.dropped for chunk in live) == LARGE_OUTPUT_BYTES
    assert live[-1].eof


def test_interleaved_writes_keep_order(engine: EngineRunner, sandbox_id: str) -> None:
    count = 2000
    result = engine.python(
        sandbox_id,
        "import sys\n"
        f"for i in range({count}):\n"
        "    sys.stdout.write(f'out-{i}\\n')\n"
        "    sys.stdout.flush()\n"
        "    sys.stderr.write(f'err-{i}\\n')\n"
        "    sys.stderr.flush()",
    )
    assert result.exit_code == 0
    assert result.stdout.decode().splitlines() == [f"out-{i}" for i in range(count)]
    assert result.stderr.decode().splitlines() == [f"err-{i}" for i in range(count)]


def test_concurrent_and_late_readers_identical(
    engine: EngineRunner, sandbox_id: str
) -> None:
    expected = b"".join(f"line {i}\n".encode() for i in range(200))

    async def read_three_ways() -> tuple[bytes, bytes, bytes]:
        process = await engine.engine.exec(
            sandbox_id,
            [
                "python3",
                "-c",
                "import sys, time\n"
                "for i in range(200):\n"
                "    sys.stdout.write(f'line {i}\\n')\n"
                "    sys.stdout.flush()\n"
                "    time.sleep(0.002)",
            ],
        )
        first, second = await asyncio.gather(
            engine.chunks_async(sandbox_id, process.pid),
            engine.chunks_async(sandbox_id, process.pid),
        )
        await engine.engine.wait(sandbox_id, process.pid)
        late = await engine.chunks_async(sandbox_id, process.pid)
        return tuple(
            b"".join(c.data for c in chunks) for chunks in (first, second, late)
        )

    first, second, late = engine.call(read_three_ways())
    assert first == expected
    assert second == expected
    assert late == expected


def test_read_after_eof_empty(engine: EngineRunner, sandbox_id: str) -> None:
    process = engine.exec(sandbox_id, ["echo", "done"])
    data = engine.read(sandbox_id, process.pid)
    engine.wait(sandbox_id, process.pid)
    again = engine.chunks(sandbox_id, process.pid, offset=len(data))
    assert data == b"done\n"
    assert len(again) == 1
    assert again[0].data == b""
    assert again[0].eof


def test_read_without_follow(engine: EngineRunner, sandbox_id: str) -> None:
    process = engine.exec(sandbox_id, ["echo", "done"])
    engine.wait(sandbox_id, process.pid)

    async def read_once(offset: int) -> list[OutputChunk]:
        return [
            chunk
            async for chunk in engine.engine.read_output(
                sandbox_id, process.pid, Stream.STDOUT, offset=offset, follow=False
            )
        ]

    whole = engine.call(read_once(0))
    rest = engine.call(read_once(5))
    assert [chunk.data for chunk in whole] == [b"done\n"]
    assert whole[0].eof
    assert [chunk.data for chunk in rest] == [b""]
    assert rest[0].eof


# Stdin.


def test_stdin_echoed_by_cat(engine: EngineRunner, sandbox_id: str) -> None:
    # More than a pipe buffer (64 KiB), so write_stdin must wait for cat.
    data = bytes(range(256)) * 1024
    process = engine.exec(sandbox_id, ["cat"], stdin=True)
    engine.call(engine.engine.write_stdin(sandbox_id, process.pid, data))
    engine.call(engine.engine.close_stdin(sandbox_id, process.pid))
    output = engine.read(sandbox_id, process.pid)
    info = engine.wait(sandbox_id, process.pid)
    assert info.exit_code == 0
    assert output == data


def test_stdin_defaults_to_dev_null(engine: EngineRunner, sandbox_id: str) -> None:
    started = time.monotonic()
    result = engine.run(sandbox_id, ["cat"])
    assert result.exit_code == 0
    assert result.stdout == b""
    assert time.monotonic() - started < 5.0


def test_write_stdin_after_exit_fails(engine: EngineRunner, sandbox_id: str) -> None:
    process = engine.exec(sandbox_id, ["true"], stdin=True)
    info = engine.wait(sandbox_id, process.pid, timeout=10)
    assert info.state == ProcessState.EXITED
    with pytest.raises(FailedPrecondition):
        engine.call(engine.engine.write_stdin(sandbox_id, process.pid, b"late\n"))


def test_write_stdin_without_pipe_fails(engine: EngineRunner, sandbox_id: str) -> None:
    process = engine.exec(sandbox_id, ["sleep", "30"])
    with pytest.raises(FailedPrecondition, match="stdin=True"):
        engine.call(engine.engine.write_stdin(sandbox_id, process.pid, b"x"))
    engine.call(engine.engine.kill(sandbox_id, process.pid))


# Signals and waiting.


def test_kill_sigterm_reports_143(engine: EngineRunner, sandbox_id: str) -> None:
    process = engine.exec(sandbox_id, ["sleep", "100"])
    engine.call(engine.engine.kill(sandbox_id, process.pid, signal.SIGTERM))
    info = engine.wait(sandbox_id, process.pid, timeout=10)
    assert info.exit_code == 143
    assert info.signal == "SIGTERM"
    assert info.reason == ExitReason.KILLED


def test_exec_starts_with_default_signals(
    engine: EngineRunner, sandbox_id: str
) -> None:
    status = engine.run(sandbox_id, ["cat", "/proc/self/status"])
    fields = dict(line.split(":\t", 1) for line in status.text.splitlines())
    # glibc's posix_spawn leaves its two internal signals, 32 and 33, ignored
    # (bits 31 and 32 of the mask); glibc programs install their own handlers
    # for them at start-up. Every other signal must be at its default.
    glibc_internal = (1 << 31) | (1 << 32)
    assert int(fields["SigIgn"], 16) & ~glibc_internal == 0
    assert int(fields["SigBlk"], 16) == 0


def test_signal_to_self_kills_shell(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["sh", "-c", "kill -USR1 $$; echo survived"])
    assert result.stdout == b""
    assert result.exit_code == 128 + signal.SIGUSR1
    assert result.info.signal == "SIGUSR1"
    assert result.info.reason == ExitReason.SIGNALED


def test_wait_timeout_on_running(engine: EngineRunner, sandbox_id: str) -> None:
    process = engine.exec(sandbox_id, ["sleep", "100"])
    started = time.monotonic()
    info = engine.wait(sandbox_id, process.pid, timeout=0.2)
    waited = time.monotonic() - started
    engine.call(engine.engine.kill(sandbox_id, process.pid))
    assert info.state == ProcessState.RUNNING
    assert info.exit_code is None
    assert info.ended_at is None
    assert waited < 2.0


def test_list_processes_includes_exited(engine: EngineRunner, sandbox_id: str) -> None:
    failed = engine.run(sandbox_id, ["sh", "-c", "exit 3"])
    succeeded = engine.run(sandbox_id, ["true"])
    running = engine.exec(sandbox_id, ["sleep", "100"])
    listed = engine.call(engine.engine.list_processes(sandbox_id))
    engine.call(engine.engine.kill(sandbox_id, running.pid))
    by_pid = {info.pid: info for info in listed}
    assert by_pid[failed.info.pid].exit_code == 3
    assert by_pid[failed.info.pid].state == ProcessState.EXITED
    assert by_pid[succeeded.info.pid].exit_code == 0
    assert by_pid[running.pid].state == ProcessState.RUNNING
    assert by_pid[running.pid].argv == ["sleep", "100"]


# Exec failures and concurrency.


def test_exec_missing_program_not_found(engine: EngineRunner, sandbox_id: str) -> None:
    with pytest.raises(NotFound, match="engine-no-such-program"):
        engine.exec(sandbox_id, ["engine-no-such-program", "arg"])


def test_exec_missing_path_not_found(engine: EngineRunner, sandbox_id: str) -> None:
    with pytest.raises(NotFound, match="/engine/no/such/program"):
        engine.exec(sandbox_id, ["/engine/no/such/program"])


def test_exec_missing_cwd_not_found(engine: EngineRunner, sandbox_id: str) -> None:
    with pytest.raises(NotFound, match="/engine-no-such-dir"):
        engine.exec(sandbox_id, ["true"], cwd="/engine-no-such-dir")


def test_exec_sees_cwd_and_env(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(
        sandbox_id,
        ["sh", "-c", 'pwd; echo "$ENGINE_TEST_VALUE"'],
        cwd="/tmp",
        env={"ENGINE_TEST_VALUE": "a b=c"},
    )
    assert result.text == "/tmp\na b=c\n"


def test_fifty_concurrent_execs(engine: EngineRunner, sandbox_id: str) -> None:
    async def run_all() -> list[object]:
        return await asyncio.gather(
            *(engine.run_async(sandbox_id, ["echo", str(i)]) for i in range(50))
        )

    results = engine.call(run_all())
    assert [result.exit_code for result in results] == [0] * 50
    assert [result.stdout for result in results] == [
        f"{i}\n".encode() for i in range(50)
    ]
    assert len({result.info.pid for result in results}) == 50


# Sandbox lifetime.


def test_ttl_expires_idle_sandbox(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    started = time.monotonic()
    sandbox_id = new_sandbox(ttl=2)
    engine.wait_until(
        lambda: engine.state(sandbox_id) == SandboxState.TERMINATED,
        "the sandbox to expire",
        timeout=10,
    )
    elapsed = time.monotonic() - started
    info = engine.call(engine.engine.get_sandbox(sandbox_id))
    assert info.reason == TerminationReason.TTL
    assert elapsed >= 2.0
    assert elapsed < 4.5


def test_ttl_zero_never_expires(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox(ttl=0)
    time.sleep(3.0)
    assert engine.state(sandbox_id) == SandboxState.RUNNING


def test_update_ttl_extends_lifetime(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox(ttl=2)
    time.sleep(1.0)
    info = engine.call(engine.engine.update_ttl(sandbox_id, 30))
    assert info.spec.ttl == 30
    time.sleep(2.5)
    assert engine.state(sandbox_id) == SandboxState.RUNNING


def test_terminated_sandbox_rejects_exec(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox()
    process = engine.exec(sandbox_id, ["sleep", "100"])
    engine.terminate(sandbox_id)
    info = engine.call(engine.engine.get_sandbox(sandbox_id))
    assert info.state == SandboxState.TERMINATED
    assert info.reason == TerminationReason.USER
    with pytest.raises(FailedPrecondition, match="terminated"):
        engine.exec(sandbox_id, ["true"])
    with pytest.raises(FailedPrecondition, match="terminated"):
        engine.call(engine.engine.stats(sandbox_id))
    killed = engine.wait(sandbox_id, process.pid, timeout=5)
    assert killed.state == ProcessState.EXITED
    assert killed.exit_code == 137


def test_exec_relative_path_entry_uses_cwd(
    engine: EngineRunner, sandbox_id: str
) -> None:
    # execvp resolves a relative PATH entry against the cwd of the new process.
    script = (
        "printf '#!/bin/sh\\necho from-root\\n' > /root/hello; chmod +x /root/hello"
    )
    assert engine.run(sandbox_id, ["sh", "-c", script]).exit_code == 0
    result = engine.run(sandbox_id, ["hello"], cwd="/root", env={"PATH": ".:/bin"})
    assert result.text == "from-root\n"
    result = engine.run(
        sandbox_id, ["sh", "-c", "echo $0"], cwd="/", env={"PATH": "bin"}
    )
    assert result.text == "sh\n"
    with pytest.raises(NotFound, match="'sh' not found in PATH"):
        engine.exec(sandbox_id, ["sh", "-c", "true"], cwd="/tmp", env={"PATH": "bin"})


def test_exited_processes_evicted_past_cap(
    engine: EngineRunner, sandbox_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.core import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_KEPT_PROCESSES", 4)
    monkeypatch.setattr(engine_module, "EVICTION_BATCH", 2)
    monkeypatch.setattr(engine_module, "MAX_FINISHED_PROCESSES", 3)
    sleeper = engine.exec(sandbox_id, ["sleep", "60"])
    pids = []
    for number in range(8):
        process = engine.exec(sandbox_id, ["echo", str(number)])
        engine.wait(sandbox_id, process.pid, timeout=30)
        pids.append(process.pid)
    listed = engine.call(engine.engine.list_processes(sandbox_id))
    # The running sleeper stays however old it is.
    running = [info.pid for info in listed if info.state == ProcessState.RUNNING]
    assert running == [sleeper.pid]
    # The latest exited processes keep their output.
    latest = pids[-1]
    info = engine.wait(sandbox_id, latest, timeout=30)
    assert info.exit_code == 0
    # The oldest were evicted: Wait no longer finds them, and the finished
    # list contains at most MAX_FINISHED_PROCESSES of them.
    with pytest.raises(NotFound, match="keeps the output of the last 4"):
        engine.wait(sandbox_id, pids[0], timeout=1)
    assert len(listed) <= 4 + 2 + 3
    evicted = [info for info in listed if info.pid in pids[:3]]
    assert evicted
    assert all(info.state == ProcessState.EXITED for info in evicted)
    engine.call(engine.engine.kill(sandbox_id, sleeper.pid, signal.SIGKILL))
