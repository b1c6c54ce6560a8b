"""Deployed functions: warm containers that run them, one pool per deployment.

A container is a sandbox of the deployment's image and limits in which the
runner (``engine/core/function_runner.py``) has imported the function's module
once. Calls reach the runner as frames on its stdin, through the Engine's
exec and stdin machinery, and results come back as frames on its stdout.
A container serves one call at a time.

``FunctionPool`` keeps at most ``workers`` containers per deployment. A call
takes an idle container, or starts a new one while the pool is below
``workers``, or else waits in a queue of at most ``max_pending`` calls. A call
that finds the queue full is rejected with ``QueueFull``. A container that
has been idle for ``keep_warm`` seconds is terminated (at once for 0). A
call that times out, is cancelled or loses its runner terminates its
container.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import struct
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.core.deployments import (
    Deployment,
    DeploymentSpec,
    DeploymentStore,
    check_package,
    check_spec,
)
from engine.core.models import SandboxSpec, Stream
from engine.core.outbound import check_outbound_url
from engine.core.tenancy import acting_for
from engine.errors import (
    DeadlineExceeded,
    EngineError,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
)

if TYPE_CHECKING:
    from engine.core.engine import Engine
    from engine.core.tasks import TaskQueues

T = TypeVar("T")
log = logging.getLogger(__name__)

RUNNER_SOURCE = (Path(__file__).parent / "function_runner.py").read_text()
HEADER = struct.Struct(">I")
# Seconds a new container may take to start and import the module.
START_TIMEOUT = 120.0
# Largest frame accepted from a runner, in bytes. The runner caps results at
# 4 MiB; a larger length means a broken or hostile runner, whose container is
# stopped before the daemon buffers the frame.
MAX_FRAME_BYTES = 8 * 1024 * 1024
# Characters of the runner's stderr quoted when it exits unexpectedly.
STDERR_TAIL_CHARS = 2000


class FunctionError(EngineError):
    """The deployed function raised; carries the exception's type and message."""

    code = "INTERNAL"

    def __init__(self, error_type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class CallTimeout(DeadlineExceeded):
    """A call ran past the deployment's timeout; its container was terminated."""


class QueueFull(ResourceExhausted):
    """More calls wait for a container than the deployment's max_pending."""


@dataclass(frozen=True)
class CallResult:
    """The function's return value and the files it left in the outputs dir."""

    value: Any
    # [{"name": path relative to the outputs dir, "size": bytes}]
    outputs: list[dict[str, Any]]


def _in_deployment_workspace(
    method: Callable[..., Coroutine[Any, Any, T]],
) -> Callable[..., Coroutine[Any, Any, T]]:
    """Run a Container method as its deployment's workspace, which owns the sandbox."""

    @functools.wraps(method)
    async def wrapper(self: Container, *args: Any, **kwargs: Any) -> T:
        with acting_for(self.deployment.spec.workspace):
            return await method(self, *args, **kwargs)

    return wrapper


class Container:
    """One sandbox with a runner that has imported the function's module."""

    def __init__(self, engine: Engine, deployment: Deployment) -> None:
        self.engine = engine
        self.deployment = deployment
        self.sandbox_id = ""
        self.pid = 0
        self.alive = False
        self._frames: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._terminator: asyncio.Task[None] | None = None
        self.expiry: asyncio.TimerHandle | None = None

    @_in_deployment_workspace
    async def start(self, package: bytes) -> None:
        """Create the sandbox, start the runner and wait until it is ready."""
        spec = self.deployment.spec
        info = await self.engine.create_sandbox(
            SandboxSpec(
                image=spec.image,
                cpu=spec.cpu,
                memory_mib=spec.memory_mib,
                name=f"fn-{spec.name}-v{self.deployment.version}",
                labels={
                    "engine.deployment": self.deployment.deployment_id,
                    "engine.workspace": spec.workspace,
                },
                # The pool ends the container; the ttl never does.
                ttl=0,
            )
        )
        self.sandbox_id = info.sandbox_id
        try:
            process = await self.engine.exec(
                self.sandbox_id,
                ["python3", "-I", "-c", RUNNER_SOURCE, spec.handler],
                env={"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
                stdin=True,
            )
            self.pid = process.pid
            self.alive = True
            self._reader = asyncio.create_task(self._read_frames())
            await self.engine.write_stdin(
                self.sandbox_id, self.pid, HEADER.pack(len(package)) + package
            )
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for returns
            # the result and drops a cancellation that arrives in the same
            # loop iteration as the frame, so a cancelled task would run on.
            async with asyncio.timeout(START_TIMEOUT):
                ready = await self._next_frame()
        except BaseException:
            await self.stop()
            raise
        if not ready.get("ready"):
            await self.stop()
            raise FunctionError(
                ready.get("type", "ImportError"),
                f"cannot load {spec.handler}: {ready.get('message', '')}",
                ready.get("traceback", "") if spec.traceback else "",
            )
        log.info(
            "deployment %s v%d: container %s ready",
            spec.name,
            self.deployment.version,
            self.sandbox_id,
        )

    @_in_deployment_workspace
    async def _read_frames(self) -> None:
        buffer = bytearray()
        try:
            async for chunk in self.engine.read_output(
                self.sandbox_id, self.pid, Stream.STDOUT
            ):
                if chunk.dropped:
                    log.error(
                        "container %s: %d bytes of frames were dropped",
                        self.sandbox_id,
                        chunk.dropped,
                    )
                    break
                buffer += chunk.data
                while len(buffer) >= HEADER.size:
                    (length,) = HEADER.unpack_from(buffer)
                    if length > MAX_FRAME_BYTES:
                        raise ValueError(
                            f"the runner sent a frame of {length} bytes, over the"
                            f" limit of {MAX_FRAME_BYTES}"
                        )
                    if len(buffer) < HEADER.size + length:
                        break
                    data = bytes(buffer[HEADER.size : HEADER.size + length])
                    del buffer[: HEADER.size + length]
                    self._frames.put_nowait(json.loads(data))
        except (EngineError, ValueError) as error:
            log.error("container %s: reading frames failed: %s", self.sandbox_id, error)
        finally:
            self.alive = False
            self._frames.put_nowait(None)
            # A runner that stops framing cannot serve calls: end its sandbox,
            # which also ends a call waiting for a frame.
            if self.sandbox_id:
                self._terminator = asyncio.get_running_loop().create_task(
                    self._terminate_quietly()
                )

    @_in_deployment_workspace
    async def _terminate_quietly(self) -> None:
        with contextlib.suppress(EngineError):
            await self.engine.terminate_sandbox(self.sandbox_id)

    async def _next_frame(self) -> dict[str, Any]:
        frame = await self._frames.get()
        if frame is None:
            self._frames.put_nowait(None)
            raise Unavailable(
                f"the runner of deployment {self.deployment.spec.name!r} exited"
                f" unexpectedly in sandbox {self.sandbox_id}: {await self._stderr()}"
            )
        return frame

    @_in_deployment_workspace
    async def _stderr(self) -> str:
        with contextlib.suppress(EngineError):
            async for chunk in self.engine.read_output(
                self.sandbox_id, self.pid, Stream.STDERR, follow=False
            ):
                text = chunk.data.decode(errors="replace").strip()
                return text[-STDERR_TAIL_CHARS:] or "no output on stderr"
        return "no output on stderr"

    @_in_deployment_workspace
    async def call(
        self, kwargs: dict[str, Any], timeout: float, outputs: str | None = None
    ) -> CallResult:
        """Call the function; raise FunctionError, CallTimeout or Unavailable."""
        if not self.alive:
            raise Unavailable(f"container {self.sandbox_id} has stopped")
        data = json.dumps({"kwargs": kwargs, "outputs": outputs}).encode()
        await self.engine.write_stdin(
            self.sandbox_id, self.pid, HEADER.pack(len(data)) + data
        )
        try:
            async with asyncio.timeout(timeout):
                frame = await self._next_frame()
        except TimeoutError:
            raise CallTimeout(
                f"deployment {self.deployment.spec.name!r} timed out after"
                f" {timeout:g} s; the call was killed"
            ) from None
        if not frame.get("ok"):
            raise FunctionError(
                frame.get("type", "Exception"),
                frame.get("message", ""),
                frame.get("traceback", "") if self.deployment.spec.traceback else "",
            )
        return CallResult(frame.get("result"), frame.get("outputs") or [])

    @_in_deployment_workspace
    async def stop(self) -> None:
        """Terminate the sandbox; safe to call more than once."""
        self.alive = False
        if self.expiry is not None:
            self.expiry.cancel()
        if self.sandbox_id:
            with contextlib.suppress(EngineError):
                await self.engine.terminate_sandbox(self.sandbox_id)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class FunctionPool:
    """The containers of one deployment and the calls waiting for them."""

    def __init__(self, functions: Functions, deployment: Deployment) -> None:
        self.functions = functions
        self.deployment = deployment
        self.spec: DeploymentSpec = deployment.spec
        self.idle: list[Container] = []
        # Containers running or starting, idle ones included.
        self.total = 0
        # Each waiter receives a container, or None when it may start one.
        self.waiters: deque[asyncio.Future[Container | None]] = deque()
        self.closed = False
        self._package: bytes | None = None

    @property
    def busy(self) -> int:
        return self.total - len(self.idle)

    async def call(
        self,
        kwargs: dict[str, Any],
        outputs: str | None = None,
        collect: Callable[[Container, CallResult], Awaitable[None]] | None = None,
        started: Callable[[Container], None] | None = None,
    ) -> CallResult:
        """Run one call on a container of this deployment and return its result.

        ``started`` is called with the container once the call has one, so
        that a cancel can stop it. ``collect`` runs after a successful call
        and before the container serves another one, so that it can copy the
        call's output files.
        """
        container = await self._acquire()
        healthy = False
        try:
            if started is not None:
                started(container)
            result = await container.call(kwargs, self.spec.timeout, outputs)
            if collect is not None and result.outputs:
                await collect(container, result)
            healthy = True
            return result
        except FunctionError:
            healthy = container.alive
            raise
        finally:
            self._release(container, healthy)

    async def _acquire(self) -> Container:
        loop = asyncio.get_running_loop()
        while True:
            if self.closed:
                raise FailedPrecondition(
                    f"deployment {self.spec.name!r} v{self.deployment.version}"
                    " was deleted"
                )
            while self.idle:
                container = self.idle.pop()
                if container.expiry is not None:
                    container.expiry.cancel()
                    container.expiry = None
                if container.alive:
                    return container
                self.total -= 1
            if self.total < self.spec.workers:
                return await self._start_container()
            if len(self.waiters) >= self.spec.max_pending:
                raise QueueFull(
                    f"deployment {self.spec.name!r} has {len(self.waiters)} calls"
                    f" waiting, its limit (max_pending); retry later"
                )
            waiter: asyncio.Future[Container | None] = loop.create_future()
            self.waiters.append(waiter)
            try:
                container = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    handed = waiter.result()
                    if handed is not None:
                        self._release(handed, True)
                    else:
                        self._wake_one()
                else:
                    with contextlib.suppress(ValueError):
                        self.waiters.remove(waiter)
                raise
            if container is not None:
                return container
            if self.total < self.spec.workers:
                return await self._start_container()

    async def _start_container(self) -> Container:
        self.total += 1
        container = Container(self.functions.engine, self.deployment)
        try:
            if self._package is None:
                path = self.functions.store.package_path(self.deployment.deployment_id)
                self._package = await asyncio.to_thread(path.read_bytes)
            await container.start(self._package)
        except BaseException:
            self.total -= 1
            self._wake_one()
            raise
        return container

    def _wake_one(self) -> None:
        """Tell the first waiter that it may start a container."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, container: Container, healthy: bool) -> None:
        if not healthy or not container.alive or self.closed:
            self.total -= 1
            self.functions.background(container.stop())
            self._wake_one()
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(container)
                return
        keep_warm = self.spec.keep_warm or 0.0
        if keep_warm <= 0:
            self.total -= 1
            self.functions.background(container.stop())
            return
        self.idle.append(container)
        loop = asyncio.get_running_loop()
        container.expiry = loop.call_later(keep_warm, self._expire, container)

    def _expire(self, container: Container) -> None:
        if container in self.idle:
            self.idle.remove(container)
            self.total -= 1
            log.info(
                "deployment %s: container %s idle for %g s; stopping it",
                self.spec.name,
                container.sandbox_id,
                self.spec.keep_warm,
            )
            self.functions.background(container.stop())

    async def close(self) -> None:
        """Stop the idle containers and fail the waiting calls."""
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        idle, self.idle = self.idle, []
        self.total -= len(idle)
        await asyncio.gather(*(c.stop() for c in idle), return_exceptions=True)


class Functions:
    """Deployments of one Engine: their store, pools and task queues."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._store: DeploymentStore | None = None
        self.pools: dict[str, FunctionPool] = {}
        self.tasks: TaskQueues | None = None
        self._background: set[asyncio.Future[Any]] = set()

    @property
    def store(self) -> DeploymentStore:
        if self._store is None:
            if self.engine.store is None:
                raise Unavailable(
                    "the engine is not started; call `await engine.start()` first"
                )
            self._store = DeploymentStore(
                self.engine.store.db, self.engine.config.data_dir / "deployments"
            )
        return self._store

    async def start(self) -> None:
        """Open the store and start the task queues, recovering their tasks."""
        from engine.core.tasks import TaskQueues

        self.tasks = TaskQueues(self)
        await self.tasks.start()

    async def close(self) -> None:
        """Stop the task queues and every container."""
        if self.tasks is not None:
            await self.tasks.close()
        pools, self.pools = list(self.pools.values()), {}
        await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def background(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run ``coroutine`` as a task that close() waits for."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def deploy(self, spec: DeploymentSpec, package: bytes) -> Deployment:
        resolved = spec.resolved()
        check_spec(resolved)
        check_outbound_url(
            "callback_url", resolved.callback_url, self.engine.outbound_allowed
        )
        # The package check reads the whole archive, so it runs in a thread.
        await asyncio.to_thread(check_package, package, resolved.handler)
        deployment = self.store.create(resolved, package, checked=True)
        log.info(
            "deployed %s %s v%d as %s in workspace %s",
            resolved.kind.value,
            resolved.name,
            deployment.version,
            deployment.deployment_id,
            resolved.workspace,
        )
        return deployment

    async def delete(self, deployment_id: str, workspace: str | None = None) -> None:
        """Delete a deployment, stop its containers and cancel its pending tasks."""
        deployment = self.store.get(deployment_id, workspace)
        pool = self.pools.pop(deployment_id, None)
        if self.tasks is not None:
            await self.tasks.forget_deployment(deployment_id)
        if pool is not None:
            await pool.close()
        self.store.delete(deployment.deployment_id)
        log.info("deleted deployment %s (%s)", deployment_id, deployment.name)

    def pool(self, deployment: Deployment) -> FunctionPool:
        pool = self.pools.get(deployment.deployment_id)
        if pool is None:
            pool = FunctionPool(self, deployment)
            self.pools[deployment.deployment_id] = pool
        return pool

    async def invoke(self, deployment: Deployment, kwargs: dict[str, Any]) -> Any:
        """Call an endpoint deployment's function with ``kwargs``."""
        result = await self.pool(deployment).call(kwargs)
        return result.value


_FUNCTIONS: weakref.WeakKeyDictionary[Engine, Functions] = weakref.WeakKeyDictionary()


def for_engine(engine: Engine) -> Functions:
    """Return the Functions object of ``engine``, creating it on first use."""
    functions = _FUNCTIONS.get(engine)
    if functions is None:
        functions = Functions(engine)
        _FUNCTIONS[engine] = functions
    return functions
