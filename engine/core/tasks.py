"""Task queues: durable tasks run on the containers of task queue deployments.

Every task is a row in the Engine's SQLite database, written before the
submitter gets its task id, so a daemon killed with SIGKILL loses no accepted
task. States: PENDING, then RUNNING, then COMPLETE, ERROR, CANCELLED or
TIMEOUT. A task whose function raises runs again while its attempts are at
most ``retries``; a timeout kills the call and ends the task as TIMEOUT.

Each deployment has one asyncio queue of task ids and ``workers`` worker
coroutines, each of which runs one task at a time on the deployment's pool.
On start, RUNNING tasks of a previous daemon go back to PENDING while they
have retries left and become ERROR otherwise, and PENDING tasks are queued
again in submission order.

Cancel and completion race only on the event loop thread: each writes its
state with an UPDATE conditioned on the state it expects, so exactly one of
them wins and the other reads the winner's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.deployments import Deployment, DeploymentKind
from engine.core.functions import CallResult, CallTimeout, Container, FunctionError
from engine.core.tenancy import acting_for
from engine.errors import EngineError, InvalidArgument, NotFound

if TYPE_CHECKING:
    from engine.core.functions import Functions

log = logging.getLogger(__name__)

# Directory inside the container where a task's function writes output files.
OUTPUTS_DIRECTORY = "/outputs"
# Largest total size of one task's output files, in bytes.
MAX_OUTPUT_BYTES = 256 * 1024 * 1024
# Largest number of output files kept per task; each is copied by its own
# file worker in the container.
MAX_OUTPUT_FILES = 1000
# Seconds between two scans for expired output files.
SWEEP_INTERVAL = 5.0
# Delays in seconds between callback attempts after a 5xx or connection error.
CALLBACK_BACKOFF = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
CALLBACK_TIMEOUT = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    deployment_id TEXT NOT NULL,
    status TEXT NOT NULL,
    kwargs TEXT NOT NULL,
    result TEXT,
    error TEXT,
    attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    outputs TEXT NOT NULL,
    outputs_expire_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, created_at);
"""


class TaskStatus(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"


FINAL = {
    TaskStatus.COMPLETE,
    TaskStatus.ERROR,
    TaskStatus.CANCELLED,
    TaskStatus.TIMEOUT,
}


@dataclass(frozen=True)
class Task:
    task_id: str
    workspace: str
    deployment_id: str
    status: TaskStatus
    kwargs: dict[str, Any]
    # JSON value returned by the function, once COMPLETE.
    result: Any
    # {"type", "message", "traceback"} once ERROR or TIMEOUT.
    error: dict[str, str] | None
    attempts: int
    created_at: float
    started_at: float | None
    ended_at: float | None
    # [{"name", "size"}] of the stored output files.
    outputs: list[dict[str, Any]]
    outputs_expire_at: float | None


@dataclass
class CancelReport:
    """Result of a cancel request, by task id."""

    cancelled: list[str]
    # Task id -> final status of a task that had ended before the request.
    finished: dict[str, str]
    not_found: list[str]


def _task(row: tuple) -> Task:
    return Task(
        task_id=row[0],
        workspace=row[1],
        deployment_id=row[2],
        status=TaskStatus(row[3]),
        kwargs=json.loads(row[4]),
        result=json.loads(row[5]) if row[5] is not None else None,
        error=json.loads(row[6]) if row[6] is not None else None,
        attempts=row[7],
        created_at=row[8],
        started_at=row[9],
        ended_at=row[10],
        outputs=json.loads(row[11]),
        outputs_expire_at=row[12],
    )


class _Queue:
    """The pending task ids and worker coroutines of one deployment."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.ids: asyncio.Queue[str] = asyncio.Queue()
        self.workers: list[asyncio.Task[None]] = []


class TaskQueues:
    """Every task queue of one Engine."""

    def __init__(self, functions: Functions) -> None:
        self.functions = functions
        self.db = functions.store.db
        self.outputs_dir = functions.engine.config.data_dir / "outputs"
        self.queues: dict[str, _Queue] = {}
        # Task id -> the asyncio task running its current attempt.
        self.running: dict[str, asyncio.Task[CallResult]] = {}
        # Task id -> the container running it, once the call has one.
        self.containers: dict[str, Container] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()
        self._client: Any = None
        self.closing = False

    # Lifecycle.

    async def start(self) -> None:
        self.db.executescript(SCHEMA)
        self.outputs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._recover()
        self._sweeper = asyncio.create_task(self._sweep_outputs())

    def _recover(self) -> None:
        """Requeue the PENDING tasks and settle the RUNNING ones of a previous run."""
        store = self.functions.store
        now = time.time()
        rows = self.db.execute(
            "SELECT * FROM tasks WHERE status IN ('PENDING', 'RUNNING')"
            " ORDER BY created_at"
        ).fetchall()
        for task in map(_task, rows):
            try:
                deployment = store.get(task.deployment_id)
            except NotFound:
                self._end(task.task_id, TaskStatus.CANCELLED, now, expect=None)
                continue
            if task.status == TaskStatus.RUNNING:
                if task.attempts <= deployment.spec.retries:
                    log.warning(
                        "task %s was running when the daemon stopped; retrying it",
                        task.task_id,
                    )
                    self.db.execute(
                        "UPDATE tasks SET status = 'PENDING' WHERE id = ?",
                        (task.task_id,),
                    )
                else:
                    log.warning(
                        "task %s was running when the daemon stopped and has no"
                        " retries left; marking it ERROR",
                        task.task_id,
                    )
                    error = {
                        "type": "DaemonRestart",
                        "message": "the daemon stopped while the task was running",
                        "traceback": "",
                    }
                    self._end(
                        task.task_id, TaskStatus.ERROR, now, error=error, expect=None
                    )
                    continue
            self._queue(deployment).ids.put_nowait(task.task_id)

    async def close(self) -> None:
        """Stop the workers; interrupted tasks go back to PENDING for the next start."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        # Each worker removes its task from self.running as it stops.
        interrupted = list(self.running)
        workers = [w for queue in self.queues.values() for w in queue.workers]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for task_id in interrupted:
            self.db.execute(
                "UPDATE tasks SET status = 'PENDING', attempts = attempts - 1"
                " WHERE id = ? AND status = 'RUNNING'",
                (task_id,),
            )
        self.running.clear()
        if self._callbacks:
            await asyncio.wait(self._callbacks, timeout=CALLBACK_TIMEOUT)
            for callback in self._callbacks:
                callback.cancel()
        if self._client is not None:
            await self._client.aclose()

    # Submission and queries.

    def _queue(self, deployment: Deployment) -> _Queue:
        queue = self.queues.get(deployment.deployment_id)
        if queue is None:
            queue = _Queue(deployment)
            self.queues[deployment.deployment_id] = queue
            for _ in range(deployment.spec.workers):
                queue.workers.append(asyncio.create_task(self._work(queue)))
        return queue

    def submit(self, deployment: Deployment, kwargs: dict[str, Any]) -> str:
        """Store a PENDING task and queue it; return its id once it is committed."""
        from engine.core.functions import QueueFull

        if deployment.spec.kind != DeploymentKind.TASK_QUEUE:
            raise NotFound(f"task queue {deployment.name!r} not found")
        queue = self._queue(deployment)
        # NOTE: the queue size includes ids of tasks cancelled while pending,
        # until a worker reaches and skips them.
        if queue.ids.qsize() >= deployment.spec.max_pending:
            raise QueueFull(
                f"task queue {deployment.name!r} has {queue.ids.qsize()} pending"
                " tasks, its limit (max_pending); retry later"
            )
        task_id = str(uuid.uuid4())
        # The connection is in autocommit mode, so the row is committed (and,
        # in WAL mode, survives a crash of this process) when execute returns.
        self.db.execute(
            "INSERT INTO tasks VALUES (?, ?, ?, 'PENDING', ?, NULL, NULL, 0, ?,"
            " NULL, NULL, '[]', NULL)",
            (
                task_id,
                deployment.workspace,
                deployment.deployment_id,
                json.dumps(kwargs),
                time.time(),
            ),
        )
        queue.ids.put_nowait(task_id)
        return task_id

    def get(self, task_id: str, workspace: str | None = None) -> Task:
        row = self.db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None or (workspace is not None and row[1] != workspace):
            raise NotFound(f"task {task_id!r} not found")
        return _task(row)

    def cancel(self, task_ids: Iterable[str], workspace: str | None) -> CancelReport:
        """Cancel tasks: pending ones leave the queue, running ones are killed.

        Cancelling a cancelled task reports it as cancelled again.
        """
        report = CancelReport([], {}, [])
        now = time.time()
        for task_id in dict.fromkeys(task_ids):
            try:
                task = self.get(task_id, workspace)
            except NotFound:
                report.not_found.append(task_id)
                continue
            if task.status == TaskStatus.CANCELLED:
                report.cancelled.append(task_id)
                continue
            if task.status in FINAL:
                report.finished[task_id] = task.status.value
                continue
            if self._end(task_id, TaskStatus.CANCELLED, now, expect=task.status):
                report.cancelled.append(task_id)
                running = self.running.get(task_id)
                if running is not None:
                    running.cancel()
                # Stopping the container kills the call even when the
                # cancellation lands after the call's result has arrived.
                container = self.containers.pop(task_id, None)
                if container is not None:
                    self.functions.background(container.stop())
                log.info("task %s cancelled (%s)", task_id, task.status.value)
                self._callback_cancelled(task_id, task.deployment_id)
            else:
                status = self.get(task_id).status
                if status == TaskStatus.CANCELLED:
                    report.cancelled.append(task_id)
                else:
                    report.finished[task_id] = status.value
        return report

    async def forget_deployment(self, deployment_id: str) -> None:
        """Cancel a deleted deployment's tasks and stop its workers."""
        queue = self.queues.pop(deployment_id, None)
        rows = self.db.execute(
            "SELECT id FROM tasks WHERE deployment_id = ?"
            " AND status IN ('PENDING', 'RUNNING')",
            (deployment_id,),
        ).fetchall()
        self.cancel([row[0] for row in rows], None)
        if queue is not None:
            for worker in queue.workers:
                worker.cancel()
            await asyncio.gather(*queue.workers, return_exceptions=True)

    # State changes.

    def _end(
        self,
        task_id: str,
        status: TaskStatus,
        now: float,
        *,
        expect: TaskStatus | None,
        result: Any = None,
        error: dict[str, str] | None = None,
    ) -> bool:
        """Write a final state; return False when the task was not in ``expect``."""
        query = "UPDATE tasks SET status = ?, result = ?, error = ?, ended_at = ?"
        query += " WHERE id = ?"
        params: list[Any] = [
            status.value,
            json.dumps(result) if result is not None else None,
            json.dumps(error) if error is not None else None,
            now,
            task_id,
        ]
        if expect is not None:
            query += " AND status = ?"
            params.append(expect.value)
        return self.db.execute(query, params).rowcount == 1

    async def _work(self, queue: _Queue) -> None:
        while True:
            task_id = await queue.ids.get()
            try:
                await self._run(queue.deployment, task_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task %s: worker failed", task_id)

    async def _run(self, deployment: Deployment, task_id: str) -> None:
        now = time.time()
        cursor = self.db.execute(
            "UPDATE tasks SET status = 'RUNNING', attempts = attempts + 1,"
            " started_at = COALESCE(started_at, ?) WHERE id = ? AND status = 'PENDING'",
            (now, task_id),
        )
        if cursor.rowcount != 1:
            return  # Cancelled while it waited in the queue.
        task = self.get(task_id)
        spec = deployment.spec
        pool = self.functions.pool(deployment)

        async def collect(container: Container, result: CallResult) -> None:
            await self._store_outputs(task_id, container, result)

        def started(container: Container) -> None:
            self.containers[task_id] = container

        call = asyncio.ensure_future(
            pool.call(
                task.kwargs,
                outputs=OUTPUTS_DIRECTORY,
                collect=collect,
                started=started,
            )
        )
        self.running[task_id] = call
        try:
            await asyncio.wait({call})
        except asyncio.CancelledError:
            # The worker is stopping (shutdown or delete): kill the call too.
            call.cancel()
            with contextlib.suppress(BaseException):
                await call
            raise
        finally:
            self.running.pop(task_id, None)
            self.containers.pop(task_id, None)

        now = time.time()
        if call.cancelled():
            return  # cancel() wrote CANCELLED before it cancelled the call.
        error = call.exception()
        if error is None:
            expire_at = now + spec.outputs_expire
            self.db.execute(
                "UPDATE tasks SET outputs_expire_at = ? WHERE id = ?",
                (expire_at, task_id),
            )
            ended = self._end(
                task_id,
                TaskStatus.COMPLETE,
                now,
                expect=TaskStatus.RUNNING,
                result=call.result().value,
            )
        elif isinstance(error, CallTimeout):
            ended = self._end(
                task_id,
                TaskStatus.TIMEOUT,
                now,
                expect=TaskStatus.RUNNING,
                error={"type": "TimeoutError", "message": str(error), "traceback": ""},
            )
        else:
            if isinstance(error, FunctionError):
                details = {
                    "type": error.error_type,
                    "message": error.message,
                    "traceback": error.traceback,
                }
            elif isinstance(error, EngineError):
                details = {
                    "type": type(error).__name__,
                    "message": str(error),
                    "traceback": "",
                }
            else:
                log.error("task %s failed in the engine", task_id, exc_info=error)
                details = {
                    "type": "InternalError",
                    "message": "the engine failed to run the task; see its log",
                    "traceback": "",
                }
            if task.attempts <= spec.retries:
                retried = self.db.execute(
                    "UPDATE tasks SET status = 'PENDING', error = ? WHERE id = ?"
                    " AND status = 'RUNNING'",
                    (json.dumps(details), task_id),
                )
                if retried.rowcount == 1:
                    log.info(
                        "task %s: attempt %d failed with %s; retrying",
                        task_id,
                        task.attempts,
                        details["type"],
                    )
                    self._queue(deployment).ids.put_nowait(task_id)
                return
            ended = self._end(
                task_id, TaskStatus.ERROR, now, expect=TaskStatus.RUNNING, error=details
            )
        if ended and spec.callback_url:
            self._schedule_callback(spec.callback_url, self.get(task_id))

    # Outputs.

    def output_path(self, task_id: str, name: str) -> Path:
        return self.outputs_dir / task_id / name

    async def _store_outputs(
        self, task_id: str, container: Container, result: CallResult
    ) -> None:
        """Copy the call's output files out of the container into the data dir.

        On any failure the files copied so far are removed before the error
        propagates, so a failed task leaves nothing in the outputs dir.
        """
        directory = self.outputs_dir / task_id
        try:
            # The container belongs to its deployment's workspace.
            with acting_for(container.deployment.spec.workspace):
                stored = await self._copy_outputs(task_id, container, result, directory)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        self.db.execute(
            "UPDATE tasks SET outputs = ? WHERE id = ?", (json.dumps(stored), task_id)
        )

    async def _copy_outputs(
        self, task_id: str, container: Container, result: CallResult, directory: Path
    ) -> list[dict[str, Any]]:
        engine = self.functions.engine
        stored: list[dict[str, Any]] = []
        total = 0
        if len(result.outputs) > MAX_OUTPUT_FILES:
            log.warning(
                "task %s: %d output files; only the first %d are kept",
                task_id,
                len(result.outputs),
                MAX_OUTPUT_FILES,
            )
        for entry in result.outputs[:MAX_OUTPUT_FILES]:
            name = str(entry["name"])
            parts = Path(name).parts
            if not parts or Path(name).is_absolute() or ".." in parts:
                log.warning("task %s: skipping invalid output name %r", task_id, name)
                continue
            content = await engine.files.read_file(
                container.sandbox_id, f"{OUTPUTS_DIRECTORY}/{name}"
            )
            total += content.size
            if total > MAX_OUTPUT_BYTES:
                await content.chunks.aclose()
                log.warning(
                    "task %s: output files over %d bytes; the rest are not kept",
                    task_id,
                    MAX_OUTPUT_BYTES,
                )
                break
            target = directory / name
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                file = open(target, "wb")  # noqa: SIM115
            except OSError as error:
                await content.chunks.aclose()
                raise InvalidArgument(
                    f"output file {name!r} cannot be stored: {error.strerror}"
                ) from None
            with file:
                async for chunk in content.chunks:
                    file.write(chunk)
            stored.append({"name": name, "size": content.size})
        return stored

    async def _sweep_outputs(self) -> None:
        while True:
            now = time.time()
            rows = self.db.execute(
                "SELECT id FROM tasks WHERE outputs_expire_at IS NOT NULL"
                " AND outputs_expire_at <= ? AND outputs != '[]'",
                (now,),
            ).fetchall()
            for (task_id,) in rows:
                await asyncio.to_thread(shutil.rmtree, self.outputs_dir / task_id, True)
                self.db.execute(
                    "UPDATE tasks SET outputs = '[]' WHERE id = ?", (task_id,)
                )
                log.info("task %s: output files expired and were deleted", task_id)
            await asyncio.sleep(SWEEP_INTERVAL)

    # Callbacks.

    def _callback_cancelled(self, task_id: str, deployment_id: str) -> None:
        try:
            deployment = self.functions.store.get(deployment_id)
        except NotFound:
            return
        if deployment.spec.callback_url:
            self._schedule_callback(deployment.spec.callback_url, self.get(task_id))

    def _schedule_callback(self, url: str, task: Task) -> None:
        body: dict[str, Any] = {"task_id": task.task_id, "status": task.status.value}
        if task.status == TaskStatus.COMPLETE:
            body["result"] = task.result
        else:
            body["error"] = task.error
        callback = asyncio.create_task(self._deliver(url, body))
        self._callbacks.add(callback)
        callback.add_done_callback(self._callbacks.discard)

    async def _deliver(self, url: str, body: dict[str, Any]) -> None:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=CALLBACK_TIMEOUT)
        task_id = body["task_id"]
        for attempt, delay in enumerate((0.0, *CALLBACK_BACKOFF), start=1):
            if delay:
                await asyncio.sleep(delay)
            try:
                response = await self._client.post(url, json=body)
            except httpx.HTTPError as error:
                log.warning(
                    "task %s: callback attempt %d to %s failed: %s",
                    task_id,
                    attempt,
                    url,
                    error,
                )
                continue
            if response.status_code < 500:
                if response.status_code >= 400:
                    log.warning(
                        "task %s: callback to %s returned %d; not retrying",
                        task_id,
                        url,
                        response.status_code,
                    )
                return
            log.warning(
                "task %s: callback attempt %d to %s returned %d",
                task_id,
                attempt,
                url,
                response.status_code,
            )
        log.error(
            "task %s: callback to %s failed after %d attempts",
            task_id,
            url,
            len(CALLBACK_BACKOFF) + 1,
        )
