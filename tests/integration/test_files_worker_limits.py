"""File workers that sandbox data could keep busy stay within the sandbox's limits.

A search's memory and CPU time depend on the files and the pattern: a sparse
file read as one line costs gigabytes of memory, and a backtracking pattern
can run for hours on one short line. The worker runs outside the sandbox's
PID namespace, so PID 1 cannot kill it. These tests check that the sandbox's
cgroups bound it and that no worker outlives its call or its sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

import psutil
import pytest

from engine.core.files import MAX_FILE_WORKERS
from engine.errors import FailedPrecondition, InternalError, ResourceExhausted
from tests.conftest import EngineRunner

# A line of 42 "a"s against this pattern backtracks about 2**42 times.
BACKTRACKING_PATTERN = "(a|a)*c"
BACKTRACKING_LINE = "a" * 42 + "\n"
# Seconds within which a killed worker must be gone.
WORKER_EXIT_SECONDS = 10.0


def _file_workers(runner: EngineRunner, sandbox_id: str, mount_ns: str) -> list[int]:
    """Return the pids of the zygote's children in the sandbox's mount namespace."""
    sandbox = runner.engine.sandboxes[sandbox_id]
    init_pid = sandbox.init.pid if sandbox.init is not None else None
    workers = []
    for child in psutil.Process(runner.zygote_pid).children():
        if child.pid == init_pid:
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{child.pid}/ns/mnt") == mount_ns:
                workers.append(child.pid)
    return workers


def _mount_ns(runner: EngineRunner, sandbox_id: str) -> str:
    init = runner.engine.sandboxes[sandbox_id].init
    assert init is not None
    return os.readlink(f"/proc/{init.pid}/ns/mnt")


def _start_backtracking_search(
    runner: EngineRunner, sandbox_id: str
) -> tuple[asyncio.Future[object], int]:
    """Start a search that would run for hours; return its future and worker pid."""
    result = runner.run(
        sandbox_id,
        ["sh", "-c", f"printf '{BACKTRACKING_LINE}' > /root/line.txt"],
    )
    assert result.exit_code == 0
    mount_ns = _mount_ns(runner, sandbox_id)
    search = runner.engine.files.find_in_files(
        sandbox_id, "/root/line.txt", BACKTRACKING_PATTERN
    )
    future = asyncio.run_coroutine_threadsafe(search, runner.loop)
    workers: list[int] = []

    def started() -> bool:
        workers[:] = _file_workers(runner, sandbox_id, mount_ns)
        return bool(workers)

    runner.wait_until(started, "the search's file worker")
    assert len(workers) == 1
    return future, workers[0]


def test_search_of_sparse_line_hits_memory_limit(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox(memory_mib=128)
    # 8 KiB of text, then a hole: one line of 1 GiB without a NUL in the
    # first 8 KiB, which takes no disk space.
    result = engine.python(
        sandbox_id,
        "import os\n"
        "with open('/root/sparse.txt', 'wb') as f:\n"
        "    f.write(b'a' * 8192)\n"
        "    f.truncate(1 << 30)\n",
    )
    assert result.exit_code == 0, result.stderr
    with pytest.raises(ResourceExhausted, match="find_in_files reads each line"):
        engine.call(
            engine.engine.files.find_in_files(sandbox_id, "/root/sparse.txt", "x")
        )


def test_cancelled_search_kills_worker(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox()
    future, worker = _start_backtracking_search(engine, sandbox_id)
    future.cancel()
    engine.wait_until(
        lambda: not engine.pid_alive(worker),
        "the cancelled search's worker to exit",
        timeout=WORKER_EXIT_SECONDS,
    )


def test_terminate_kills_search_worker(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox()
    future, worker = _start_backtracking_search(engine, sandbox_id)
    engine.terminate(sandbox_id)
    engine.wait_until(
        lambda: not engine.pid_alive(worker),
        "the search's worker to exit after terminate",
        timeout=WORKER_EXIT_SECONDS,
    )
    with pytest.raises(InternalError, match="exited without a result"):
        future.result(WORKER_EXIT_SECONDS)


def test_terminate_kills_stalled_download_worker(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox()
    # Larger than the data pipe, so the worker blocks until the caller reads.
    result = engine.run(
        sandbox_id, ["sh", "-c", "head -c 8388608 /dev/zero > /root/big"]
    )
    assert result.exit_code == 0
    mount_ns = _mount_ns(engine, sandbox_id)
    content = engine.call(engine.engine.files.read_file(sandbox_id, "/root/big"))
    workers = _file_workers(engine, sandbox_id, mount_ns)
    assert len(workers) == 1
    engine.terminate(sandbox_id)
    engine.wait_until(
        lambda: not engine.pid_alive(workers[0]),
        "the stalled download's worker to exit after terminate",
        timeout=WORKER_EXIT_SECONDS,
    )

    async def drain() -> None:
        async for _ in content.chunks:
            pass

    with pytest.raises(FailedPrecondition, match="was terminated while"):
        engine.call(drain())


def test_file_workers_per_sandbox_capped(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox()
    result = engine.run(
        sandbox_id, ["sh", "-c", "head -c 8388608 /dev/zero > /root/big"]
    )
    assert result.exit_code == 0
    files = engine.engine.files
    # Downloads that nobody reads keep their workers alive.
    open_downloads = [
        engine.call(files.read_file(sandbox_id, "/root/big"))
        for _ in range(MAX_FILE_WORKERS)
    ]
    with pytest.raises(ResourceExhausted, match="file operations running"):
        engine.call(files.stat_file(sandbox_id, "/root/big"))
    engine.call(open_downloads.pop().chunks.aclose())
    assert engine.call(files.stat_file(sandbox_id, "/root/big")).size == 8388608
    for content in open_downloads:
        engine.call(content.chunks.aclose())
