"""Shared fixtures: an Engine driven from synchronous tests.

The Engine is an asyncio object. ``EngineRunner`` runs a private event loop in
a background thread and exposes ``call(coro)``, which runs a coroutine on that
loop and returns its result, so tests stay plain functions. Data dirs are short
temporary directories under /tmp, removed at teardown.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from engine.config import Config
from engine.core.engine import FUSE_CGROUP, Engine
from engine.core.models import (
    OutputChunk,
    ProcessInfo,
    SandboxSpec,
    SandboxState,
    Stream,
)

T = TypeVar("T")

# Seconds one call into the engine may take before the test fails.
CALL_TIMEOUT = 60.0


def pytest_configure(config: pytest.Config) -> None:
    """Tear fixtures down on SIGTERM as on Ctrl-C.

    Killed by the default action of SIGTERM, as a CI timeout or `kill` sends
    it, pytest would leave the daemons and Engines of its fixtures running,
    with their bridges, nftables tables, mounts and cgroups. Raised as
    KeyboardInterrupt, it runs every finalizer first.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    # A child that pytest's process forks, such as pyroute2's helper for a
    # network namespace, must die of SIGTERM, not unwind into pytest's
    # teardown and close the parent's fixtures.
    os.register_at_fork(
        after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# Seconds to wait for the supervisor pool's refill or for processes to exit.
SETTLE_TIMEOUT = 15.0


def make_data_dir() -> Path:
    """Create a data dir that the sandbox's mapped uids can traverse."""
    path = Path(tempfile.mkdtemp(prefix="eng-", dir="/tmp"))
    # mkdtemp makes the directory 0700, but the supervisor runs as uid_base on
    # the host and must reach the image and overlay directories below it.
    path.chmod(0o755)
    return path


@dataclass
class Result:
    """A finished process: its final info and the complete bytes of both streams."""

    info: ProcessInfo
    stdout: bytes
    stderr: bytes

    @property
    def exit_code(self) -> int | None:
        return self.info.exit_code

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


@dataclass
class EngineRunner:
    """An Engine on its own event loop thread, with synchronous helpers."""

    data_dir: Path
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    config: Config | None = None
    engine: Engine = field(init=False)
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.config or Config.from_data_dir(self.data_dir)
        self.engine = Engine(self.config)
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="engine-loop", daemon=True
        )
        self.thread.start()

    def call(
        self, coroutine: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT
    ) -> T:
        """Run ``coroutine`` on the engine's loop and return its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def start(self) -> None:
        self.call(self.engine.start())

    def close(self) -> None:
        self.call(self.engine.close())

    def stop_loop(self, *, drain: bool = True) -> None:
        """Stop the event loop thread and close the loop, but not the engine.

        With ``drain`` the loop runs once more until the default executor has
        shut down. Without it the loop never runs again, as after a crash, and
        the executor's threads are only joined.
        """
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CALL_TIMEOUT)
        if drain:
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        else:
            executor = getattr(self.loop, "_default_executor", None)
            if executor is not None:
                executor.shutdown(wait=True)
        self.loop.close()

    # Sandboxes and processes.

    def create(self, **fields: Any) -> str:
        """Create a sandbox from SandboxSpec fields and return its id."""
        info = self.call(self.engine.create_sandbox(SandboxSpec(**fields)))
        return info.sandbox_id

    def terminate(self, sandbox_id: str) -> None:
        """Terminate the sandbox and wait until its resources are freed too."""
        self.call(self.engine.terminate_sandbox(sandbox_id))
        self.call(self.engine.settle())

    def state(self, sandbox_id: str) -> SandboxState:
        return self.call(self.engine.get_sandbox(sandbox_id)).state

    def exec(self, sandbox_id: str, argv: list[str], **options: Any) -> ProcessInfo:
        return self.call(self.engine.exec(sandbox_id, argv, **options))

    def wait(
        self, sandbox_id: str, pid: int, timeout: float | None = None
    ) -> ProcessInfo:
        return self.call(self.engine.wait(sandbox_id, pid, timeout))

    def chunks(
        self,
        sandbox_id: str,
        pid: int,
        stream: Stream = Stream.STDOUT,
        offset: int = 0,
    ) -> list[OutputChunk]:
        """Follow ``stream`` from ``offset`` to its EOF and return every chunk."""
        return self.call(collect_chunks(self.engine, sandbox_id, pid, stream, offset))

    def read(
        self,
        sandbox_id: str,
        pid: int,
        stream: Stream = Stream.STDOUT,
        offset: int = 0,
    ) -> bytes:
        """Follow ``stream`` from ``offset`` to its EOF and return its bytes."""
        return b"".join(c.data for c in self.chunks(sandbox_id, pid, stream, offset))

    def run(self, sandbox_id: str, argv: list[str], **options: Any) -> Result:
        """Exec ``argv``, read both streams to EOF and wait for the exit."""
        return self.call(run_process(self.engine, sandbox_id, argv, **options))

    async def run_async(
        self, sandbox_id: str, argv: list[str], **options: Any
    ) -> Result:
        """Coroutine form of ``run``, for use inside ``call``."""
        return await run_process(self.engine, sandbox_id, argv, **options)

    async def chunks_async(
        self,
        sandbox_id: str,
        pid: int,
        stream: Stream = Stream.STDOUT,
        offset: int = 0,
    ) -> list[OutputChunk]:
        """Coroutine form of ``chunks``, for use inside ``call``."""
        return await collect_chunks(self.engine, sandbox_id, pid, stream, offset)

    def python(self, sandbox_id: str, code: str, **options: Any) -> Result:
        """Run ``code`` with the sandbox's python3."""
        return self.run(sandbox_id, ["python3", "-c", code], **options)

    # Polling helpers, here so that test modules reach them through the fixture.

    @staticmethod
    def wait_until(
        condition: Callable[[], bool], what: str, timeout: float = SETTLE_TIMEOUT
    ) -> float:
        """Poll ``condition`` until it is true and return the seconds it took."""
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.02)
        return time.monotonic() - start

    @staticmethod
    def pid_alive(pid: int) -> bool:
        """Return True if ``pid`` exists and is not a zombie."""
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    # State of the engine's resources.

    def settle_pool(self) -> None:
        """Wait until neither the supervisor pool nor the warm pool is refilling."""
        pool = self.engine.pool
        warm = self.engine.warm
        assert pool is not None and warm is not None

        def idle() -> bool:
            return not pool.refilling() and not warm.refilling()

        self.wait_until(idle, "the pools to finish their refills")

    @property
    def zygote_pid(self) -> int:
        process = self.engine.spawner.process
        assert process is not None
        return process.pid

    def cgroup_names(self) -> set[str]:
        """Return the engine's sandbox and pool cgroups, without its FUSE group."""
        driver = self.engine.cgroup_driver
        assert driver is not None
        return set(driver.list()) - {FUSE_CGROUP}

    def warm_sandboxes(self) -> list[Any]:
        """Return the warm pool's sandboxes, which belong to no request yet."""
        warm = self.engine.warm
        assert warm is not None
        return warm.items()

    def pool_names(self) -> set[str]:
        """Return the cgroup names of the pooled supervisors and warm sandboxes."""
        pool = self.engine.pool
        assert pool is not None
        names = {slot.cgroup.name for slot in pool.slots()}
        return names | {sandbox.cgroup.name for sandbox in self.warm_sandboxes()}

    def pool_pids(self) -> set[int]:
        """Return the host pids of the pooled supervisors and warm sandboxes' PID 1."""
        pool = self.engine.pool
        assert pool is not None
        pids = {slot.pid for slot in pool.slots()}
        return pids | {sandbox.init.pid for sandbox in self.warm_sandboxes()}

    def sandbox_dirs(self) -> set[str]:
        """Return the layer dirs of the sandboxes, without the warm pool's.

        The layer file system is mounted in the zygote's namespace only, so
        it is listed through the zygote's root; none is left once that
        namespace is gone.
        """
        warm = {sandbox.info.sandbox_id for sandbox in self.warm_sandboxes()}
        try:
            return set(os.listdir(self.engine.layers.path)) - warm
        except FileNotFoundError:
            return set()

    def cgroup_name(self, sandbox_id: str) -> str:
        group = self.engine.sandboxes[sandbox_id].cgroup
        assert group is not None
        return group.name

    def host_pids(self, sandbox_id: str) -> list[int]:
        """Return the host pids of the processes in the sandbox's cgroup."""
        group = self.engine.sandboxes[sandbox_id].cgroup
        assert group is not None
        return group.pids()


async def collect_chunks(
    engine: Engine, sandbox_id: str, pid: int, stream: Stream, offset: int = 0
) -> list[OutputChunk]:
    return [
        chunk
        async for chunk in engine.read_output(sandbox_id, pid, stream, offset=offset)
    ]


async def run_process(
    engine: Engine, sandbox_id: str, argv: list[str], **options: Any
) -> Result:
    info = await engine.exec(sandbox_id, argv, **options)
    stdout, stderr = await asyncio.gather(
        collect_chunks(engine, sandbox_id, info.pid, Stream.STDOUT),
        collect_chunks(engine, sandbox_id, info.pid, Stream.STDERR),
    )
    final = await engine.wait(sandbox_id, info.pid)
    return Result(
        final,
        b"".join(chunk.data for chunk in stdout),
        b"".join(chunk.data for chunk in stderr),
    )


def start_runner(
    data_dir: Path | None = None, config: Config | None = None
) -> EngineRunner:
    """Start an Engine on ``data_dir``, or on a new data dir, with ``config``."""
    data_dir = config.data_dir if config is not None else data_dir or make_data_dir()
    runner = EngineRunner(data_dir, config=config)
    try:
        runner.start()
    except BaseException:
        runner.stop_loop()
        shutil.rmtree(runner.data_dir, ignore_errors=True)
        raise
    return runner


def stop_runner(runner: EngineRunner) -> None:
    """Close the engine if its loop still runs, then remove the data dir."""
    try:
        if not runner.loop.is_closed() and runner.engine.store is not None:
            runner.close()
    finally:
        runner.stop_loop()
        shutil.rmtree(runner.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def engine() -> Iterator[EngineRunner]:
    """One Engine shared by the tests that neither stop nor break it."""
    runner = start_runner()
    try:
        yield runner
    finally:
        stop_runner(runner)


@pytest.fixture
def engine_factory() -> Iterator[Callable[..., EngineRunner]]:
    """Start private Engines, each closed and its data dir removed at teardown.

    Calling it with the data dir of an earlier Engine starts a second Engine on
    the same directory, as a daemon restart would. Teardown goes in reverse
    order, so the later Engine is closed before the directory is removed.
    """
    started: list[EngineRunner] = []

    def start(data_dir: Path | None = None) -> EngineRunner:
        runner = start_runner(data_dir)
        started.append(runner)
        return runner

    yield start
    for runner in reversed(started):
        stop_runner(runner)


@pytest.fixture
def new_sandbox(engine: EngineRunner) -> Iterator[Callable[..., str]]:
    """Create sandboxes on the shared engine and terminate each at teardown."""
    created: list[str] = []

    def create(**fields: Any) -> str:
        sandbox_id = engine.create(**fields)
        created.append(sandbox_id)
        return sandbox_id

    yield create
    for sandbox_id in created:
        engine.terminate(sandbox_id)


@pytest.fixture
def sandbox_id(new_sandbox: Callable[..., str]) -> str:
    """A sandbox with the default spec on the shared engine."""
    return new_sandbox()
