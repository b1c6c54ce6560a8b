"""The Engine: one asyncio object that owns every sandbox and its processes.

The gRPC servicers, the CLI and embedded users call only this class. It
validates requests, keeps state in SQLite, and drives the runtime: the zygote
forks a supervisor per sandbox, and the supervisor forks each process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import signal as signals
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.config import Config
from engine.core import validation
from engine.core.files import SandboxFiles
from engine.core.models import (
    DEFAULT_OUTPUT_BUFFER_BYTES,
    DEFAULT_SANDBOX_OUTPUT_BYTES,
    ExitReason,
    OutputChunk,
    ProcessInfo,
    ProcessState,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    SandboxStats,
    Stream,
    TerminationReason,
)
from engine.core.output import OutputBudget, OutputBuffer
from engine.core.pool import SupervisorPool
from engine.core.store import Store
from engine.errors import (
    EngineError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from engine.runtime import cgroups
from engine.runtime.spawner import Spawner, SupervisorClient
from engine.storage.images import Image, ImageStore
from engine.storage.layers import LayerStore
from engine.storage.trees import remove_tree
from engine.storage.volumes import VolumeInfo, VolumeStore

log = logging.getLogger(__name__)

# After a process exits, its output streams stay open while a background
# child still has the pipe open; reporting the exit waits this long for them.
OUTPUT_GRACE_SECONDS = 1.0
# Seconds between two scans of the TTL reaper.
REAPER_INTERVAL = 1.0
# Seconds terminate waits for the supervisor before killing it.
TERMINATE_TIMEOUT = 10.0
# ProcessInfo of exited processes whose pid a later process reuses, per sandbox.
MAX_FINISHED_PROCESSES = 10_000
# Terminated sandboxes of earlier engine runs loaded from the database at start.
MAX_REMEMBERED_SANDBOXES = 1000
# Seconds a resolved image is reused before the image store is asked again.
IMAGE_CACHE_SECONDS = 30.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(eq=False)
class _Process:
    pid: int
    argv: list[str]
    cwd: str
    started_at: float
    stdout: OutputBuffer
    stderr: OutputBuffer
    stdin_fd: int | None
    oom_kills_at_start: int
    ended_at: float | None = None
    exit_code: int | None = None
    signal: str = ""
    reason: ExitReason = ExitReason.NONE
    timed_out: bool = False
    killed: bool = False
    timer: asyncio.TimerHandle | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def info(self) -> ProcessInfo:
        state = ProcessState.EXITED if self.exited.is_set() else ProcessState.RUNNING
        return ProcessInfo(
            pid=self.pid,
            argv=list(self.argv),
            cwd=self.cwd,
            state=state,
            exit_code=self.exit_code,
            signal=self.signal,
            reason=self.reason,
            started_at=self.started_at,
            ended_at=self.ended_at,
        )


@dataclass(eq=False)
class _Sandbox:
    info: SandboxInfo
    directory: Path
    cgroup: cgroups.Cgroup | None = None
    supervisor: SupervisorClient | None = None
    supervisor_pid: int = 0
    processes: dict[int, _Process] = field(default_factory=dict)
    # Processes whose pid was reused by a later one, kept for list_processes.
    finished: list[ProcessInfo] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    output: OutputBudget = field(
        default_factory=lambda: OutputBudget(DEFAULT_SANDBOX_OUTPUT_BYTES)
    )


class Engine:
    """Owns sandboxes, their processes, their state in SQLite and their cleanup."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sandboxes: dict[str, _Sandbox] = {}
        self.images = ImageStore(config.data_dir, config.uid_base, config.uid_count)
        # File operations on running sandboxes: engine.files.stat_file(...) etc.
        self.files = SandboxFiles(self)
        # Paths inside volumes: engine.volumes.list_path(...) etc. Create,
        # list and delete volumes with the Engine's own methods.
        self.volumes = VolumeStore(config.data_dir, config.uid_base)
        # The file system of the sandboxes' writable layers, mounted on
        # config.sandboxes_dir while the engine runs.
        self.layers = LayerStore(
            config.data_dir, config.sandboxes_dir, config.layers_size_bytes
        )
        # Volume name -> ids of the PENDING or RUNNING sandboxes that mount it.
        self._volume_users: dict[str, set[str]] = {}
        self.spawner = Spawner()
        self.store: Store | None = None
        self.cgroup_driver: cgroups.CgroupDriver | None = None
        self._lock_fd: int | None = None
        self.pool: SupervisorPool | None = None
        # Image name -> (Image, monotonic time it was resolved).
        self._images: dict[str, tuple[Image, float]] = {}
        self._reaper: asyncio.Task[None] | None = None
        # Terminations started by the reaper or by a supervisor's exit.
        self._tasks: set[asyncio.Future[None]] = set()
        self._started = False

    # Lifecycle of the Engine itself.

    async def start(self) -> None:
        """Lock the data dir, sweep crash leftovers, start the zygote and the reaper."""
        if os.geteuid() != 0:
            raise PermissionDenied(
                "the engine must run as root to create namespaces, cgroups and "
                "mounts; run `sudo engine serve`"
            )
        self.config.sandboxes_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        _check_traversable(self.config.data_dir, self.config.uid_base)
        self._lock_data_dir()
        # After the lock: it removes what an interrupted create or delete left.
        self.volumes.prepare()
        digest = hashlib.sha256(str(self.config.data_dir).encode()).hexdigest()[:8]
        self.cgroup_driver = cgroups.detect(f"engine-{digest}")
        self.store = Store(self.config.database_path)
        self.layers.sweep()
        self._sweep()
        # Before the zygote starts, so that every supervisor's copy of the
        # mount namespace has the layer file system.
        self.layers.start()
        try:
            await self.spawner.start()
        except BaseException:
            self.layers.close()
            raise
        self.pool = SupervisorPool(
            self.cgroup_driver,
            self.spawner,
            self.config.uid_base,
            self.config.uid_count,
        )
        self.pool.schedule_refill()
        self._reaper = asyncio.create_task(self._reap_expired())
        self._started = True
        log.info(
            "engine started, data dir %s, cgroup v%d",
            self.config.data_dir,
            self.cgroup_driver.version,
        )

    def _lock_data_dir(self) -> None:
        path = self.config.data_dir / "engine.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise Unavailable(
                f"data dir {self.config.data_dir} is in use by another engine "
                f"(pid {owner or 'unknown'}); "
                "stop it or pass another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _sweep(self) -> None:
        """Free what a previous engine on this data dir left after a crash."""
        assert self.store is not None and self.cgroup_driver is not None
        now = time.time()
        for info in self.store.sandboxes(live_only=True):
            log.warning(
                "sandbox %s was left by a crashed engine; marking it terminated",
                info.sandbox_id,
            )
            self.store.put_sandbox(
                replace(
                    info,
                    state=SandboxState.TERMINATED,
                    reason=TerminationReason.DAEMON_RESTART,
                    terminated_at=now,
                )
            )
        for name in self.cgroup_driver.list():
            log.warning("removing leftover cgroup %s", name)
            self.cgroup_driver.open(name).destroy()
        for entry in self.config.sandboxes_dir.iterdir():
            log.warning("removing leftover sandbox directory %s", entry)
            remove_tree(entry)
        # Earlier sandboxes stay visible to Get and List, as TERMINATED.
        for info in self.store.sandboxes()[-MAX_REMEMBERED_SANDBOXES:]:
            sandbox = _Sandbox(info, self.config.sandboxes_dir / info.sandbox_id)
            sandbox.finished = self.store.processes(info.sandbox_id)
            self.sandboxes[info.sandbox_id] = sandbox

    async def close(self) -> None:
        """Terminate every sandbox, stop the zygote and release the data dir."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        live = [
            sb
            for sb in self.sandboxes.values()
            if sb.info.state != SandboxState.TERMINATED
        ]
        await asyncio.gather(
            *self._tasks,
            *(self._terminate(sb, TerminationReason.SHUTDOWN) for sb in live),
            return_exceptions=True,
        )
        if self.pool is not None:
            await self.pool.close()
        await self.spawner.close()
        # After the zygote and every supervisor, whose mount namespaces hold
        # the layer file system.
        try:
            self.layers.close()
        except OSError as error:
            log.error("layer file system not released: %s", error)
        if self.cgroup_driver is not None:
            with contextlib.suppress(OSError, EngineError):
                self.cgroup_driver.remove_root()
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("engine stopped")

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # Sandboxes.

    async def create_sandbox(self, spec: SandboxSpec) -> SandboxInfo:
        """Create a sandbox and return once it is RUNNING."""
        self._check_started()
        validation.check_spec(spec)
        image = self._resolve_image(spec.image)
        sandbox_id = f"sb-{secrets.token_hex(6)}"
        now = time.time()
        info = SandboxInfo(
            sandbox_id=sandbox_id,
            spec=spec,
            state=SandboxState.PENDING,
            reason=TerminationReason.NONE,
            created_at=now,
            terminated_at=None,
            last_activity_at=now,
        )
        sandbox = _Sandbox(info=info, directory=self.config.sandboxes_dir / sandbox_id)
        self.sandboxes[sandbox_id] = sandbox
        try:
            await self._start_sandbox(sandbox, image)
        except BaseException as error:
            log.error("sandbox %s failed to start: %s", sandbox_id, error)
            await self._release(sandbox)
            self._set_info(
                sandbox,
                state=SandboxState.TERMINATED,
                reason=TerminationReason.ERROR,
                error=str(error),
                terminated_at=time.time(),
            )
            if isinstance(error, EngineError):
                raise
            if isinstance(error, OSError):
                raise Unavailable(
                    f"sandbox {sandbox_id} failed to start: {_os_message(error)}"
                ) from error
            raise
        self._set_info(sandbox, state=SandboxState.RUNNING)
        log.info(
            "sandbox %s started, supervisor pid %d", sandbox_id, sandbox.supervisor_pid
        )
        return sandbox.info

    def _resolve_image(self, name: str) -> Image:
        """Resolve an image name; reuse a resolution for IMAGE_CACHE_SECONDS."""
        cached = self._images.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[1] < IMAGE_CACHE_SECONDS:
            return cached[0]
        image = self.images.resolve(name)
        self._images[name] = (image, now)
        return image

    async def _start_sandbox(self, sandbox: _Sandbox, image: Image) -> None:
        assert self.cgroup_driver is not None
        spec = sandbox.info.spec
        uid = self.config.uid_base
        directory = self.layers.create(sandbox.info.sandbox_id, spec.disk_mib)
        # The supervisor is uid_base on the host, and it mounts from here.
        os.chmod(directory, 0o700)
        os.chown(directory, uid, uid)
        for name in ("root", "upper", "work"):
            (directory / name).mkdir(mode=0o755)
            os.chown(directory / name, uid, uid)
        limits = cgroups.CgroupLimits(
            cpu=spec.cpu,
            memory_bytes=spec.memory_mib * 1024 * 1024 if spec.memory_mib else None,
            pids=spec.pids,
        )
        runtime_spec = {
            "sandbox_id": sandbox.info.sandbox_id,
            "hostname": sandbox.info.sandbox_id,
            "workdir": spec.workdir,
            "tmp_size": f"{spec.memory_mib}m" if spec.memory_mib else None,
            "root": {
                "root": str(directory / "root"),
                "lower": str(image.path),
                "upper": str(directory / "upper"),
                "work": str(directory / "work"),
                "binds": [list(pair) for pair in image.binds],
            },
            "volumes": self._acquire_volumes(sandbox),
        }
        assert self.pool is not None
        slot = await self.pool.take()
        sandbox.cgroup = slot.cgroup
        sandbox.supervisor_pid = slot.pid
        sandbox.supervisor = SupervisorClient(
            slot.control, lambda pid, status: self._on_exit(sandbox, pid, status)
        )
        sandbox.supervisor.closed.add_done_callback(
            lambda _: self._on_supervisor_closed(sandbox)
        )
        slot.cgroup.set_limits(limits)
        await sandbox.supervisor.start(runtime_spec)

    def _on_supervisor_closed(self, sandbox: _Sandbox) -> None:
        if sandbox.info.state == SandboxState.RUNNING and not sandbox.lock.locked():
            log.error(
                "sandbox %s: supervisor exited unexpectedly", sandbox.info.sandbox_id
            )
            self._background(self._terminate(sandbox, TerminationReason.ERROR))

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` as a task that close() waits for."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_info(self, sandbox: _Sandbox, **changes: object) -> None:
        sandbox.info = replace(sandbox.info, **changes)
        if self.store is not None:
            self.store.put_sandbox(sandbox.info)

    def _check_started(self) -> None:
        if not self._started:
            raise Unavailable(
                "the engine is not started; call `await engine.start()` first"
            )

    def _get(self, sandbox_id: str) -> _Sandbox:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise NotFound(f"sandbox {validation.shorten(sandbox_id)} not found")
        return sandbox

    def _get_running(self, sandbox_id: str) -> _Sandbox:
        sandbox = self._get(sandbox_id)
        if sandbox.info.state != SandboxState.RUNNING:
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is {sandbox.info.state.value.lower()}"
                + (
                    f" ({sandbox.info.reason.value})"
                    if sandbox.info.reason.value
                    else ""
                )
                + "; create a new one"
            )
        return sandbox

    def _touch(self, sandbox: _Sandbox) -> None:
        sandbox.info = replace(sandbox.info, last_activity_at=time.time())

    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return self._get(sandbox_id).info

    async def list_sandboxes(
        self,
        *,
        state: SandboxState | None = None,
        labels: dict[str, str] | None = None,
        name: str | None = None,
    ) -> list[SandboxInfo]:
        result = []
        for sandbox in self.sandboxes.values():
            info = sandbox.info
            if state is not None and info.state != state:
                continue
            if name and info.spec.name != name:
                continue
            if labels and any(info.spec.labels.get(k) != v for k, v in labels.items()):
                continue
            result.append(info)
        return sorted(result, key=lambda info: info.created_at)

    async def terminate_sandbox(self, sandbox_id: str) -> SandboxInfo:
        sandbox = self._get(sandbox_id)
        await self._terminate(sandbox, TerminationReason.USER)
        return sandbox.info

    async def update_ttl(self, sandbox_id: str, ttl: float) -> SandboxInfo:
        sandbox = self._get_running(sandbox_id)
        validation.check_ttl(ttl)
        self._touch(sandbox)
        self._set_info(sandbox, spec=replace(sandbox.info.spec, ttl=float(ttl)))
        return sandbox.info

    async def _terminate(self, sandbox: _Sandbox, reason: TerminationReason) -> None:
        async with sandbox.lock:
            if sandbox.info.state == SandboxState.TERMINATED:
                return
            await self._release(sandbox)
            self._set_info(
                sandbox,
                state=SandboxState.TERMINATED,
                reason=reason,
                terminated_at=time.time(),
            )
        log.info("sandbox %s terminated (%s)", sandbox.info.sandbox_id, reason.value)
        self._forget_old_sandboxes()

    def _forget_old_sandboxes(self) -> None:
        """Keep at most MAX_REMEMBERED_SANDBOXES terminated sandboxes in memory."""
        terminated = [
            sandbox_id
            for sandbox_id, sandbox in self.sandboxes.items()
            if sandbox.info.state == SandboxState.TERMINATED
        ]
        for sandbox_id in terminated[:-MAX_REMEMBERED_SANDBOXES]:
            del self.sandboxes[sandbox_id]

    async def _release(self, sandbox: _Sandbox) -> None:
        """Kill every process of the sandbox and free its cgroup and directory."""
        supervisor = sandbox.supervisor
        if supervisor is not None:
            with contextlib.suppress(ConnectionError, OSError):
                supervisor.terminate()
            try:
                await asyncio.wait_for(
                    asyncio.shield(supervisor.closed), TERMINATE_TIMEOUT
                )
            except TimeoutError:
                log.warning(
                    "sandbox %s: supervisor did not exit; killing it",
                    sandbox.info.sandbox_id,
                )
                self.spawner.kill(sandbox.supervisor_pid)
                supervisor.channel.close()
        zygote = self.spawner.channel
        # A zygote that has died never reports the supervisor as reaped.
        if sandbox.supervisor_pid and zygote is not None and not zygote.closed.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.spawner.reaped_future(sandbox.supervisor_pid),
                    TERMINATE_TIMEOUT,
                )
            self.spawner.reaped.pop(sandbox.supervisor_pid, None)
        now = time.time()
        for process in sandbox.processes.values():
            if process.stdin_fd is not None:
                self._close_stdin(process)
            if not process.exited.is_set():
                process.killed = True
                self._finish(sandbox, process, -signals.SIGKILL, now)
        # Output of a terminated sandbox is not kept: readers see it as dropped.
        sandbox.output.release()
        loop = asyncio.get_running_loop()
        # A failure here must not keep the sandbox RUNNING: the sweep at the
        # next start removes whatever is left.
        if sandbox.cgroup is not None:
            try:
                await loop.run_in_executor(None, sandbox.cgroup.destroy)
            except EngineError as error:
                log.error(
                    "sandbox %s: cgroup not removed: %s", sandbox.info.sandbox_id, error
                )
        await loop.run_in_executor(None, self._remove_layer, sandbox)
        # Every process of the sandbox is gone, so are its volume mounts.
        for users in self._volume_users.values():
            users.discard(sandbox.info.sandbox_id)

    def _remove_layer(self, sandbox: _Sandbox) -> None:
        try:
            self.layers.remove(sandbox.info.sandbox_id)
        except OSError as error:
            log.error(
                "sandbox %s: layer not deleted, removing its files instead: %s",
                sandbox.info.sandbox_id,
                error,
            )
        remove_tree(sandbox.directory)

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(REAPER_INTERVAL)
            now = time.time()
            for sandbox in list(self.sandboxes.values()):
                info = sandbox.info
                if info.state != SandboxState.RUNNING or info.spec.ttl <= 0:
                    continue
                # A process that exec started and that still runs counts as
                # activity, so a long command is never cut off by the ttl.
                if any(not p.exited.is_set() for p in sandbox.processes.values()):
                    self._touch(sandbox)
                    continue
                if now - info.last_activity_at >= info.spec.ttl:
                    log.info(
                        "sandbox %s expired after %.0f s without activity",
                        info.sandbox_id,
                        info.spec.ttl,
                    )
                    expire = self._terminate(sandbox, TerminationReason.TTL)
                    self._background(expire)

    async def stats(self, sandbox_id: str) -> SandboxStats:
        sandbox = self._get_running(sandbox_id)
        assert sandbox.cgroup is not None
        usage = sandbox.cgroup.stats()
        return SandboxStats(
            cpu_seconds=usage.cpu_seconds,
            memory_bytes=usage.memory_bytes,
            memory_peak_bytes=usage.memory_peak_bytes,
            pids=usage.pids,
            disk_bytes=self.layers.used_bytes(sandbox_id),
        )

    # Volumes.

    def _acquire_volumes(self, sandbox: _Sandbox) -> list[dict[str, object]]:
        """Create the sandbox's volumes as needed and record it as their user.

        This runs before the first await of sandbox creation, so a concurrent
        delete_volume either finds the sandbox among the users or has already
        detached the volume, and then a new, empty one is created here.
        """
        sandbox_id = sandbox.info.sandbox_id
        mounts = []
        # Parents first, so that a volume mounted below another one is not
        # hidden by it.
        ordered = sorted(
            sandbox.info.spec.volumes, key=lambda mount: mount.mount_path.count("/")
        )
        for mount in ordered:
            self._volume_users.setdefault(mount.name, set()).add(sandbox_id)
            _, created = self.volumes.create(mount.name)
            if created:
                log.info("sandbox %s: created volume %s", sandbox_id, mount.name)
            mounts.append(
                {
                    "source": str(self.volumes.data_path(mount.name)),
                    "target": mount.mount_path,
                    "read_only": mount.read_only,
                }
            )
        return mounts

    def _with_users(self, info: VolumeInfo) -> VolumeInfo:
        users = tuple(sorted(self._volume_users.get(info.name, ())))
        return replace(info, sandbox_ids=users)

    async def create_volume(self, name: str) -> tuple[VolumeInfo, bool]:
        """Create volume ``name`` unless it exists; return it and whether it is new."""
        self._check_started()
        info, created = self.volumes.create(name)
        return self._with_users(info), created

    async def list_volumes(self) -> list[VolumeInfo]:
        """Return every volume with its usage and the sandboxes that mount it."""
        self._check_started()
        loop = asyncio.get_running_loop()
        infos = await loop.run_in_executor(None, self.volumes.list)
        return [self._with_users(info) for info in infos]

    async def delete_volume(self, name: str) -> None:
        """Delete volume ``name`` and its files, unless a sandbox mounts it."""
        self._check_started()
        users = sorted(self._volume_users.get(name, ()))
        if users:
            raise FailedPrecondition(
                f"volume {name!r} is mounted by sandbox {', '.join(users)};"
                " terminate those sandboxes first"
            )
        # Detaching is one rename, done before any await, so no sandbox can
        # start to mount the volume between the check above and here.
        trash = self.volumes.detach(name)
        self._volume_users.pop(name, None)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.volumes.purge, trash)

    # Processes.

    async def exec(
        self,
        sandbox_id: str,
        argv: list[str],
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        stdin: bool = False,
    ) -> ProcessInfo:
        """Start ``argv`` in the sandbox (no shell) and return once it runs."""
        sandbox = self._get_running(sandbox_id)
        spec = sandbox.info.spec
        cwd = cwd or spec.workdir
        env = env or {}
        validation.check_exec(argv, cwd, env, timeout)
        full_env = {
            "PATH": DEFAULT_PATH,
            "HOME": "/root",
            "HOSTNAME": sandbox_id,
            "LANG": "C.UTF-8",
        }
        full_env.update(spec.env)
        full_env.update(env)
        self._touch(sandbox)
        assert sandbox.supervisor is not None and sandbox.cgroup is not None
        try:
            oom_kills = sandbox.cgroup.oom_kills()
        except EngineError:
            # The cgroup is gone: the sandbox is being terminated.
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is terminating; create a new one"
            ) from None

        fds: list[int] = []
        try:
            stdin_read, stdin_write = (
                os.pipe2(os.O_CLOEXEC)
                if stdin
                else (os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), None)
            )
            fds.append(stdin_read)
            if stdin_write is not None:
                fds.append(stdin_write)
            stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
            fds += [stdout_read, stdout_write]
            stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
            fds += [stderr_read, stderr_write]
        except OSError as error:
            for fd in fds:
                os.close(fd)
            raise ResourceExhausted(
                f"cannot create pipes for exec: {error.strerror}"
            ) from error

        try:
            pid = await sandbox.supervisor.exec(
                list(argv),
                full_env,
                cwd,
                spec.nofile,
                [stdin_read, stdout_write, stderr_write],
            )
        except BaseException as error:
            # Cancellation included: an RPC aborted mid-exec must not leak the
            # daemon's ends of the pipes. The child's ends close below.
            for fd in (stdin_write, stdout_read, stderr_read):
                if fd is not None:
                    os.close(fd)
            if isinstance(error, OSError | ConnectionError):
                raise _exec_error(sandbox_id, argv, cwd, error) from error
            raise
        finally:
            for fd in (stdin_read, stdout_write, stderr_write):
                with contextlib.suppress(OSError):
                    os.close(fd)

        process = _Process(
            pid=pid,
            argv=list(argv),
            cwd=cwd,
            started_at=time.time(),
            stdout=OutputBuffer(
                Stream.STDOUT, DEFAULT_OUTPUT_BUFFER_BYTES, sandbox.output
            ),
            stderr=OutputBuffer(
                Stream.STDERR, DEFAULT_OUTPUT_BUFFER_BYTES, sandbox.output
            ),
            stdin_fd=stdin_write,
            oom_kills_at_start=oom_kills,
        )
        if stdin_write is not None:
            os.set_blocking(stdin_write, False)
        self._attach_reader(stdout_read, process.stdout)
        self._attach_reader(stderr_read, process.stderr)
        old = sandbox.processes.get(pid)
        if old is not None:
            sandbox.finished.append(old.info())
            del sandbox.finished[:-MAX_FINISHED_PROCESSES]
        sandbox.processes[pid] = process
        if timeout is not None and timeout > 0:
            loop = asyncio.get_running_loop()
            process.timer = loop.call_later(timeout, self._on_timeout, sandbox, process)
        assert self.store is not None
        self.store.put_process(sandbox_id, process.info())
        log.info(
            "sandbox %s: started pid %d: %s",
            sandbox_id,
            pid,
            validation.shorten(" ".join(argv)),
        )
        return process.info()

    def _attach_reader(self, fd: int, buffer: OutputBuffer) -> None:
        os.set_blocking(fd, False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                buffer.append(data)
                return
            loop.remove_reader(fd)
            os.close(fd)
            buffer.close()

        loop.add_reader(fd, readable)

    def _on_timeout(self, sandbox: _Sandbox, process: _Process) -> None:
        if process.exited.is_set() or sandbox.supervisor is None:
            return
        process.timed_out = True
        log.info(
            "sandbox %s: pid %d timed out; killing its process group",
            sandbox.info.sandbox_id,
            process.pid,
        )
        with contextlib.suppress(ConnectionError, OSError):
            sandbox.supervisor.kill(process.pid, signals.SIGKILL, group=True)

    def _on_exit(self, sandbox: _Sandbox, pid: int, status: int) -> None:
        process = sandbox.processes.get(pid)
        if process is None or process.exited.is_set():
            return
        self._finish(sandbox, process, os.waitstatus_to_exitcode(status), time.time())

    def _finish(
        self, sandbox: _Sandbox, process: _Process, code: int, now: float
    ) -> None:
        """Record how a process ended; ``code`` is an exit status or -N for signal N."""
        if process.timer is not None:
            process.timer.cancel()
        if code < 0:
            number = -code
            process.exit_code = 128 + number
            process.signal = _signal_name(number)
            if process.timed_out:
                process.reason = ExitReason.TIMEOUT
            elif number == signals.SIGKILL and self._oom_killed(sandbox, process):
                process.reason = ExitReason.OOM
            elif process.killed:
                process.reason = ExitReason.KILLED
            else:
                process.reason = ExitReason.SIGNALED
        else:
            process.exit_code = code
            process.reason = (
                ExitReason.TIMEOUT if process.timed_out else ExitReason.EXITED
            )
        process.ended_at = now
        process.exited.set()
        # An exited process reads no more input, so its stdin pipe is closed now.
        self._close_stdin(process)
        if self.store is not None:
            self.store.put_process(sandbox.info.sandbox_id, process.info())
        log.info(
            "sandbox %s: pid %d exited with %d (%s)",
            sandbox.info.sandbox_id,
            process.pid,
            process.exit_code,
            process.reason.value,
        )

    @staticmethod
    def _oom_killed(sandbox: _Sandbox, process: _Process) -> bool:
        if sandbox.cgroup is None:
            return False
        with contextlib.suppress(OSError, EngineError):
            return sandbox.cgroup.oom_kills() > process.oom_kills_at_start
        return False

    def _process(self, sandbox_id: str, pid: int) -> tuple[_Sandbox, _Process]:
        sandbox = self._get(sandbox_id)
        process = sandbox.processes.get(pid)
        if process is None:
            raise NotFound(f"process {pid} not found in sandbox {sandbox_id}")
        return sandbox, process

    async def read_output(
        self,
        sandbox_id: str,
        pid: int,
        stream: Stream,
        *,
        offset: int = 0,
        follow: bool = True,
    ) -> AsyncIterator[OutputChunk]:
        """Yield a stream's bytes from ``offset``; with ``follow``, until its EOF."""
        _, process = self._process(sandbox_id, pid)
        if offset < 0:
            raise InvalidArgument(f"offset must be 0 or more, got {offset}")
        buffer = process.stdout if stream == Stream.STDOUT else process.stderr
        if not follow:
            yield buffer.read(offset)
            return
        async for chunk in buffer.follow(offset):
            yield chunk

    async def write_stdin(self, sandbox_id: str, pid: int, data: bytes) -> None:
        sandbox, process = self._process(sandbox_id, pid)
        self._touch(sandbox)
        fd = self._stdin_fd(sandbox_id, process)
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        while view:
            try:
                written = os.write(fd, view)
                view = view[written:]
                continue
            except BlockingIOError:
                pass
            except BrokenPipeError:
                raise FailedPrecondition(
                    f"process {pid} in sandbox {sandbox_id} has closed its stdin"
                ) from None
            writable = loop.create_future()

            def ready(future: asyncio.Future[None] = writable) -> None:
                if not future.done():
                    future.set_result(None)

            loop.add_writer(fd, ready)
            try:
                done, _ = await asyncio.wait(
                    [writable, asyncio.ensure_future(process.exited.wait())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                loop.remove_writer(fd)
            if writable not in done:
                raise FailedPrecondition(
                    f"process {pid} in sandbox {sandbox_id} has exited; "
                    "its stdin is closed"
                )
            fd = self._stdin_fd(sandbox_id, process)

    def _stdin_fd(self, sandbox_id: str, process: _Process) -> int:
        if process.exited.is_set():
            raise FailedPrecondition(
                f"process {process.pid} in sandbox {sandbox_id} has exited; "
                "its stdin is closed"
            )
        if process.stdin_fd is None:
            raise FailedPrecondition(
                f"stdin of process {process.pid} in sandbox {sandbox_id} is closed "
                "or was not opened; pass stdin=True to exec"
            )
        return process.stdin_fd

    async def close_stdin(self, sandbox_id: str, pid: int) -> None:
        sandbox, process = self._process(sandbox_id, pid)
        self._touch(sandbox)
        if process.exited.is_set():
            # The pipe closed with the process; closing again is harmless.
            return
        self._stdin_fd(sandbox_id, process)
        self._close_stdin(process)

    @staticmethod
    def _close_stdin(process: _Process) -> None:
        if process.stdin_fd is not None:
            os.close(process.stdin_fd)
            process.stdin_fd = None

    async def wait(
        self, sandbox_id: str, pid: int, timeout: float | None = None
    ) -> ProcessInfo:
        """Wait until the process exits and its output ends, or ``timeout`` seconds."""
        _, process = self._process(sandbox_id, pid)
        if timeout is not None and timeout < 0:
            raise InvalidArgument(f"timeout must be 0 or more seconds, got {timeout}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled(process), timeout)
        return process.info()

    async def _settled(self, process: _Process) -> None:
        await process.exited.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_closed(process), OUTPUT_GRACE_SECONDS)

    async def kill(
        self, sandbox_id: str, pid: int, signal: int = signals.SIGKILL
    ) -> None:
        sandbox, process = self._process(sandbox_id, pid)
        if signal not in signals.valid_signals() or signal == 0:
            raise InvalidArgument(f"signal {signal} is not a valid signal number")
        if process.exited.is_set():
            return
        self._get_running(sandbox_id)
        process.killed = True
        assert sandbox.supervisor is not None
        sandbox.supervisor.kill(pid, signal, group=True)
        log.info(
            "sandbox %s: sent signal %d to process group %d", sandbox_id, signal, pid
        )

    async def list_processes(self, sandbox_id: str) -> list[ProcessInfo]:
        sandbox = self._get(sandbox_id)
        infos = sandbox.finished + [
            process.info() for process in sandbox.processes.values()
        ]
        return sorted(infos, key=lambda info: info.started_at)


async def _closed(process: _Process) -> None:
    for buffer in (process.stdout, process.stderr):
        async for chunk in buffer.follow(buffer.end):
            if chunk.eof:
                break


def _os_message(error: OSError) -> str:
    """Return an OSError's text without the "[Errno N]" prefix."""
    if error.strerror:
        if error.filename is not None:
            return f"{error.filename!r}: {error.strerror}"
        return error.strerror
    return str(error)


def _check_traversable(data_dir: Path, uid: int) -> None:
    """Raise unless host uid ``uid`` can reach ``data_dir`` through every parent.

    Sandbox supervisors run as that uid and mount the images and overlay
    directories below the data dir.
    """
    for directory in (data_dir, *data_dir.parents):
        mode = directory.stat()
        if mode.st_mode & 0o001 or (mode.st_uid == uid and mode.st_mode & 0o100):
            continue
        raise PermissionDenied(
            f"data dir {data_dir} is not reachable by sandbox uid {uid}: "
            f"{directory} has mode {mode.st_mode & 0o7777:o}; "
            f"run `chmod o+x {directory}` "
            "or choose another --data-dir"
        )


def _signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"SIG{number}"


_ERRNO_MESSAGE = re.compile(r"^\[Errno \d+\] ")


def _exec_error(
    sandbox_id: str, argv: list[str], cwd: str, error: BaseException
) -> EngineError:
    if isinstance(error, ConnectionError):
        return FailedPrecondition(
            f"sandbox {sandbox_id} stopped while starting {argv[0]!r}"
        )
    code = getattr(error, "errno", 0)
    message = _ERRNO_MESSAGE.sub(
        "", str(error.args[1] if len(error.args) > 1 else error)
    )
    if code in (2, 20):  # ENOENT, ENOTDIR
        return NotFound(message)
    if code in (11, 12, 24):  # EAGAIN, ENOMEM, EMFILE
        return ResourceExhausted(
            f"cannot start {argv[0]!r} in sandbox {sandbox_id}: {message}"
        )
    if code in (1, 13):
        return PermissionDenied(message)
    return InvalidArgument(message)
