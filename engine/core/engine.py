"""The Engine: one asyncio object that owns every sandbox and its processes.

The gRPC servicers, the CLI and embedded users call only this class. It
validates requests, keeps state in SQLite, and drives the runtime: the zygote
forks a supervisor per sandbox, the supervisor forks the sandbox's PID 1, and
PID 1 (engine-init) starts each process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
import secrets
import signal as signals
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.config import (
    Config,
    free_uid_base,
    overlapping_ranges,
    read_subordinate_ranges,
)
from engine.core import validation
from engine.core.files import SandboxFiles
from engine.core.models import (
    DEFAULT_OUTPUT_BUFFER_BYTES,
    DEFAULT_SANDBOX_OUTPUT_BYTES,
    CloudBucketConfig,
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
from engine.core.network import (
    Attachment,
    Network,
    NetworkPolicy,
    check_policy,
    open_netns,
)
from engine.core.outbound import check_outbound_url, parse_networks
from engine.core.output import OutputBudget, OutputBuffer, OutputRate
from engine.core.pool import SupervisorPool
from engine.core.ports import PortForwarder
from engine.core.secrets import SecretInfo, SecretStore
from engine.core.store import Store
from engine.core.tenancy import DEFAULT_WORKSPACE, current_workspace
from engine.core.tokens import TokenStore
from engine.core.warm import Shape, WarmPool
from engine.errors import (
    DeadlineExceeded,
    EngineError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from engine.runtime import cgroups, initbin, rootfs
from engine.runtime.spawner import InitClient, Spawner
from engine.storage import fuse
from engine.storage.fuse import FuseManager, MountConfig, S3Options
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
# Seconds terminate waits for PID 1 to exit before killing it.
TERMINATE_TIMEOUT = 10.0
# Exited processes kept per sandbox with their output, for Wait and
# ReadOutput. Past this count plus EVICTION_BATCH, exec moves the oldest
# exited ones, whose output has ended, to the finished list.
MAX_KEPT_PROCESSES = 1000
EVICTION_BATCH = 100
# ProcessInfo of exited processes that were evicted, or whose pid a later
# process reuses, per sandbox. ListProcesses still reports them.
MAX_FINISHED_PROCESSES = 1000
# Terminated sandboxes of earlier engine runs loaded from the database at start.
MAX_REMEMBERED_SANDBOXES = 1000
# Exec failure messages from engine-init are cut to this many characters.
MAX_EXEC_ERROR_CHARS = 300
# The cgroup of the FUSE servers, outside every sandbox's, and its limits:
# the servers parse the requests that sandbox code sends through its mounts,
# so a flood of them costs at most this much of the host.
FUSE_CGROUP = "fuse-servers"
FUSE_LIMITS = cgroups.CgroupLimits(cpu=1.0, memory_bytes=1 << 30, pids=1024)
# Minimum bytes that one read of an output pipe counts against the output rate.
READ_COST_BYTES = 64 * 1024
# Ports one sandbox may expose at once.
MAX_EXPOSED_PORTS = 32
# Tasks the engine itself runs in a sandbox's cgroup, added to its pids limit:
# PID 1, and the supervisor until it has exited after forking PID 1.
HELPER_PIDS = 2
# Seconds between a change of sandbox or process state and its write to the
# store, so that the changes of that time share one transaction.
STORE_FLUSH_SECONDS = 0.05
# Seconds a resolved image is reused before the image store is asked again.
IMAGE_CACHE_SECONDS = 30.0
# Threads that start and stop FUSE servers at once.
FUSE_THREADS = 8
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
    # Futures that the exit completes.
    exit_waiters: list[asyncio.Future[None]] = field(default_factory=list)

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
    # The control socket of the sandbox's PID 1, which also has its host pid.
    init: InitClient | None = None
    # The image's directory and the disk limit that the layer was set up with.
    image_path: str = ""
    # Device, inode and ctime of the image's directory at set-up, or None if
    # it was missing. A rebuilt image has the same path but a new directory,
    # whose inode number the file system may have reused.
    image_identity: tuple[int, int, int] | None = None
    disk_mib: int = 0
    # Stops of the sandbox's bucket FUSE servers, started at terminate.
    fuse_stops: list[asyncio.Future[None]] = field(default_factory=list)
    # The egress policy that the sandbox's nftables chain applies; None while
    # it has no chain.
    policy: NetworkPolicy | None = None
    processes: dict[int, _Process] = field(default_factory=dict)
    # Processes whose pid was reused by a later one, kept for list_processes.
    finished: list[ProcessInfo] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    output: OutputBudget = field(
        default_factory=lambda: OutputBudget(DEFAULT_SANDBOX_OUTPUT_BYTES)
    )
    output_rate: OutputRate = field(default_factory=OutputRate)
    # Output pipes whose reading waits for output_rate: fd -> (timer, resume).
    paused_readers: dict[int, tuple[asyncio.TimerHandle, Callable[[], None]]] = field(
        default_factory=dict
    )
    # Values of spec.secrets, looked up at creation. Kept in memory only, and
    # out of repr so that no log line can show them.
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    # Access and secret key of each of spec.cloud_buckets, in order.
    bucket_keys: list[tuple[str, str]] = field(default_factory=list, repr=False)
    # Names of the FUSE servers of the sandbox's bucket mounts.
    fuse_servers: list[str] = field(default_factory=list)
    # The veth pair and address of a networked sandbox.
    attachment: Attachment | None = None
    # The sandbox's network namespace, kept open for exposed ports.
    netns_fd: int | None = None
    forwarders: dict[int, PortForwarder] = field(default_factory=dict)
    # Host pids of the file workers that have not finished reporting, and the
    # number of workers being forked.
    file_workers: set[int] = field(default_factory=set)
    file_workers_starting: int = 0


class Engine:
    """Owns sandboxes, their processes, their state in SQLite and their cleanup."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Networks beyond the public ones that the host may connect to for
        # token holders; see engine.core.outbound.
        self.outbound_allowed = parse_networks(config.outbound_allow)
        self.sandboxes: dict[str, _Sandbox] = {}
        # Ids of terminated sandboxes in self.sandboxes, oldest first.
        self._terminated: collections.deque[str] = collections.deque()
        self.images = ImageStore(config.data_dir, config.uid_base, config.uid_count)
        # File operations on running sandboxes: engine.files.stat_file(...) etc.
        self.files = SandboxFiles(self)
        # Paths inside volumes: engine.volumes.list_path(...) etc. Create,
        # list and delete volumes with the Engine's own methods.
        # Workspace -> its volumes; see the ``volumes`` property.
        self._volume_stores = {
            DEFAULT_WORKSPACE: VolumeStore(config.data_dir, config.uid_base)
        }
        # The file system of the sandboxes' writable layers, mounted on
        # config.sandboxes_dir while the engine runs.
        self.layers = LayerStore(
            config.data_dir, config.sandboxes_dir, config.layers_size_bytes
        )
        # Volume name -> ids of the PENDING or RUNNING sandboxes that mount it.
        self._volume_users: dict[str, set[str]] = {}
        # FUSE servers of fsspec volumes (one per volume, started on first
        # mount and kept until the volume is deleted or the engine stops) and
        # of bucket mounts (one per mount and sandbox).
        self.fuse = FuseManager(config.data_dir, config.uid_base)
        self._fuse_locks: dict[str, asyncio.Lock] = {}
        # Starting and stopping servers blocks for seconds, so it has threads
        # of its own and never holds up the default executor's work.
        self._fuse_executor = ThreadPoolExecutor(
            max_workers=FUSE_THREADS, thread_name_prefix="engine-fuse"
        )
        self.spawner = Spawner()
        self.store: Store | None = None
        # API tokens, for the gRPC TCP listener and the HTTP routes.
        self.tokens: TokenStore | None = None
        self.secrets: SecretStore | None = None
        self.cgroup_driver: cgroups.CgroupDriver | None = None
        self._lock_fd: int | None = None
        self.pool: SupervisorPool | None = None
        # Sandboxes set up ahead of demand, for the shapes requested last.
        self.warm: WarmPool[_Sandbox] | None = None
        self.network: Network | None = None
        # Image name -> (Image, monotonic time it was resolved).
        self._images: dict[str, tuple[Image, float]] = {}
        self._reaper: asyncio.Task[None] | None = None
        # The pending write of the store's buffered rows.
        self._flush: asyncio.TimerHandle | None = None
        # Terminations started by the reaper or by the exit of a PID 1.
        self._tasks: set[asyncio.Future[None]] = set()
        self._started = False

    @property
    def volumes(self) -> VolumeStore:
        """The volumes of the current workspace.

        The default workspace's live in DATA_DIR/volumes, and another's in
        DATA_DIR/volumes/@WORKSPACE, a name no volume can have.
        """
        workspace = current_workspace()
        store = self._volume_stores.get(workspace)
        if store is None:
            default = self._volume_stores[DEFAULT_WORKSPACE]
            store = VolumeStore(
                self.config.data_dir,
                self.config.uid_base,
                directory=default.directory / f"@{workspace}",
            )
            store.prepare()
            self._volume_stores[workspace] = store
        return store

    # Lifecycle of the Engine itself.

    async def start(self) -> None:
        """Lock the data dir, sweep crash leftovers, start the zygote and the reaper."""
        if os.geteuid() != 0:
            raise PermissionDenied(
                "the engine must run as root to create namespaces, cgroups and "
                "mounts; run `sudo engine serve`"
            )
        self._check_uid_range()
        self.network = Network(
            self.config.data_dir,
            subnet=self.config.subnet,
            dns_servers=self.config.dns_servers,
            uplinks=self.config.uplinks,
        )
        loop = asyncio.get_running_loop()
        # Bad settings fail here, before anything on the host changes.
        await loop.run_in_executor(None, self.network.validate)
        _check_traversable(self.config.data_dir, self.config.uid_base)
        self.config.sandboxes_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        self._lock_data_dir()
        try:
            # After the lock: it removes what an interrupted create or delete left.
            self._volume_stores[DEFAULT_WORKSPACE].prepare()
            # Before the pool forks supervisors: see FuseManager.prepare.
            self.fuse.prepare()
            digest = hashlib.sha256(str(self.config.data_dir).encode()).hexdigest()[:8]
            self.cgroup_driver = cgroups.detect(f"engine-{digest}")
            cgroups.remove_stale_roots(self.cgroup_driver.root_dirs)
            self.store = Store(self.config.database_path)
            self.tokens = TokenStore(self.store.db)
            self.secrets = SecretStore(self.store.db)
            self.layers.sweep()
            self._sweep()
            self.fuse.cgroup = self.cgroup_driver.create(FUSE_CGROUP, FUSE_LIMITS)
            # Its start also removes the bridge, veths and nftables table that a
            # crashed engine on this data dir left.
            await loop.run_in_executor(None, self.network.start)
            # Before the zygote starts, so that every supervisor's copy of the
            # mount namespace has the layer file system.
            self.layers.start()
            init_path = await loop.run_in_executor(
                None, initbin.build, self.config.data_dir / "bin"
            )
            await self.spawner.start(str(init_path), str(self.layers.mount_point))
            assert self.spawner.process is not None
            self.layers.hand_off(self.spawner.process.pid)
            self.pool = SupervisorPool(
                self.cgroup_driver,
                self.spawner,
                self.config.uid_base,
                self.config.uid_count,
                network=self.network,
            )
            self.pool.schedule_refill(network=not self.config.block_network_by_default)
            self.warm = WarmPool(
                self._prepare_warm,
                self._release,
                self._warm_alive,
                size=self.config.warm_pool_size,
            )
        except BaseException:
            # What the start made on the host goes again: the FUSE mount, the
            # cgroups, the bridge and table, the layer file system, the zygote
            # and the data dir lock.
            try:
                await self.close()
            except Exception as error:
                log.error("cleanup after a failed start was incomplete: %s", error)
            raise
        self._reaper = asyncio.create_task(self._reap_expired())
        self._started = True
        log.info(
            "engine started, data dir %s, cgroup v%d",
            self.config.data_dir,
            self.cgroup_driver.version,
        )

    def _check_uid_range(self) -> None:
        """Raise FailedPrecondition if a user may map ids of the engine's range."""
        ranges = read_subordinate_ranges(self.config.subordinate_id_files)
        base, count = self.config.uid_base, self.config.uid_count
        overlaps = overlapping_ranges(base, count, ranges)
        if not overlaps:
            return
        listed = "; ".join(str(overlap) for overlap in overlaps)
        raise FailedPrecondition(
            f"the engine's uid range {base}-{base + count - 1} overlaps {listed},"
            " so those users could reach sandbox files and processes; start the"
            f" engine with --uid-base {free_uid_base(count, ranges)} and build"
            " its images again"
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
            sandbox.finished = self.store.processes(
                info.sandbox_id, MAX_FINISHED_PROCESSES
            )
            self.sandboxes[info.sandbox_id] = sandbox
            self._terminated.append(info.sandbox_id)

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
        warm = self.warm.close() if self.warm is not None else asyncio.sleep(0)
        await asyncio.gather(
            *self._tasks,
            *(self._terminate(sb, TerminationReason.SHUTDOWN) for sb in live),
            warm,
            return_exceptions=True,
        )
        # The terminations above free their sandboxes in tasks of their own,
        # which must end before the zygote, the layers and the cgroup root go.
        await self.settle()
        if self.pool is not None:
            # A failure here must not skip the rest: the zygote, the network
            # and the data dir lock are released below either way.
            try:
                await self.pool.close()
            except (EngineError, OSError) as error:
                log.error("supervisor pool not fully removed: %s", error)
        await asyncio.get_running_loop().run_in_executor(
            self._fuse_executor, self.fuse.stop_all
        )
        if self.fuse.cgroup is not None:
            with contextlib.suppress(OSError, EngineError):
                self.fuse.cgroup.destroy()
            self.fuse.cgroup = None
        await self.spawner.close()
        if self.network is not None:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, self.network.close)
            except EngineError as error:
                log.error("network not removed: %s", error)
            self.network = None
        # After the zygote and every supervisor, whose mount namespaces hold
        # the layer file system.
        try:
            self.layers.close()
        except OSError as error:
            log.error("layer file system not released: %s", error)
        if self.cgroup_driver is not None:
            with contextlib.suppress(OSError, EngineError):
                self.cgroup_driver.remove_root()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.store is not None:
            self.tokens = None
            self.store.close()
            self.store = None
            self.secrets = None
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
        for mount in spec.cloud_buckets:
            check_outbound_url(
                "cloud bucket endpoint", mount.config.endpoint, self.outbound_allowed
            )
        # Before anything exists, so that an unknown name leaves nothing behind.
        secret_env = self._resolve_secrets(spec.secrets)
        bucket_keys = [self._bucket_keys(mount.config) for mount in spec.cloud_buckets]
        self._check_volume_backends(spec)
        policy = self._policy(spec)
        spec = replace(spec, block_network=policy.block, allow_list=policy.allow_list)
        image = self._resolve_image(spec.image)
        sandbox = await self._take_warm(spec, image)
        warm = sandbox is not None
        if sandbox is None:
            sandbox = self._new_sandbox(spec, image)
        now = time.time()
        sandbox.info = SandboxInfo(
            sandbox_id=sandbox.info.sandbox_id,
            spec=spec,
            state=SandboxState.PENDING,
            reason=TerminationReason.NONE,
            created_at=now,
            terminated_at=None,
            last_activity_at=now,
            workspace=current_workspace(),
            address=sandbox.info.address,
        )
        sandbox.secret_env = secret_env
        sandbox.bucket_keys = bucket_keys
        sandbox_id = sandbox.info.sandbox_id
        self.sandboxes[sandbox_id] = sandbox
        try:
            if not warm:
                await self._set_up(sandbox, image)
            await self._apply_request(sandbox)
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
        shape = Shape.of(spec)
        if not warm and shape is not None and self.warm is not None:
            self.warm.want(shape)
        assert sandbox.init is not None
        log.info(
            "sandbox %s started%s, image %s, PID 1 is host pid %d",
            sandbox_id,
            " from the warm pool" if warm else "",
            spec.image,
            sandbox.init.pid,
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

    def _new_sandbox(self, spec: SandboxSpec, image: Image) -> _Sandbox:
        """Return the record of a new sandbox, which nothing has set up yet."""
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
            workspace=current_workspace(),
        )
        return _Sandbox(
            info=info,
            directory=self.config.sandboxes_dir / sandbox_id,
            image_path=str(image.path),
            image_identity=_directory_identity(image.path),
            disk_mib=spec.disk_mib,
        )

    async def _take_warm(self, spec: SandboxSpec, image: Image) -> _Sandbox | None:
        """Return a warm sandbox set up for ``spec``'s shape, if one is ready."""
        shape = Shape.of(spec)
        if shape is None or self.warm is None:
            return None
        sandbox = await self.warm.take(shape)
        if sandbox is not None and (
            sandbox.image_path != str(image.path)
            or sandbox.image_identity != _directory_identity(image.path)
        ):
            # The image was built again or removed since this sandbox was set
            # up, so the sandbox's root shows the old image's files, or none.
            await self._release(sandbox)
            return None
        return sandbox

    async def _prepare_warm(self, shape: Shape) -> _Sandbox:
        """Set up a sandbox of ``shape`` for the warm pool."""
        spec = shape.spec()
        image = self._resolve_image(spec.image)
        sandbox = self._new_sandbox(spec, image)
        try:
            await self._set_up(sandbox, image)
        except (Exception, asyncio.CancelledError):
            # Not on GeneratorExit: a loop that is being torn down runs no
            # more awaits, and the next start sweeps what is left.
            await self._release(sandbox)
            raise
        return sandbox

    @staticmethod
    def _warm_alive(sandbox: _Sandbox) -> bool:
        """Return False if a warm sandbox's PID 1 or its veth pair is gone."""
        if sandbox.init is None or sandbox.init.closed.done():
            return False
        if sandbox.attachment is not None:
            try:
                socket.if_nametoindex(sandbox.attachment.host_ifname)
            except OSError:
                return False
        return True

    async def _set_up(self, sandbox: _Sandbox, image: Image) -> None:
        """Do the part of a sandbox's setup that depends only on its shape.

        That is the writable layer, a pooled supervisor, the root file system
        and PID 1; ``_apply_request`` adds the rest. Nothing is written to
        the store here, because a warm sandbox belongs to no request yet.
        """
        assert self.cgroup_driver is not None
        spec = sandbox.info.spec
        # The supervisor is uid_base on the host, and it mounts from here.
        self.layers.create(
            sandbox.info.sandbox_id, sandbox.disk_mib, uid=self.config.uid_base
        )
        # The supervisor names the same directory by its own mount point.
        directory = self.layers.real_path(sandbox.info.sandbox_id)
        memory_bytes = spec.memory_mib * 1024 * 1024 if spec.memory_mib else None
        tmp, shm = rootfs.tmpfs_limits(memory_bytes)
        runtime_spec = {
            "sandbox_id": sandbox.info.sandbox_id,
            "hostname": sandbox.info.sandbox_id,
            "workdir": spec.workdir,
            "tmp": tmp.to_message(),
            "shm": shm.to_message(),
            "root": {
                "root": str(directory / "root"),
                "lower": str(image.path),
                "upper": str(directory / "upper"),
                "work": str(directory / "work"),
                "binds": [list(pair) for pair in image.binds],
            },
            "volumes": await self._mounts(sandbox),
        }
        assert self.pool is not None and self.network is not None
        networked = not spec.block_network
        slot = await self.pool.take(network=networked)
        sandbox.cgroup = slot.cgroup
        sandbox.attachment, slot.attachment = slot.attachment, None
        sandbox.netns_fd = open_netns(slot.pid)
        if sandbox.attachment is not None:
            address = sandbox.attachment.address.ip
            runtime_spec["address"] = str(address)
            runtime_spec["resolv_conf"] = self.network.resolv_conf()
            sandbox.info = replace(sandbox.info, address=str(address))
            # The chain exists before anything runs. A warm sandbox gets the
            # policy of its shape, which is what most requests ask for.
            policy = NetworkPolicy(spec.block_network, spec.allow_list)
            # An nftables transaction takes milliseconds; the loop serves
            # requests meanwhile.
            await asyncio.get_running_loop().run_in_executor(
                None,
                self.network.apply,
                sandbox.info.sandbox_id,
                sandbox.attachment,
                policy,
            )
            sandbox.policy = policy
        sandbox.init = InitClient(
            slot.control, lambda pid, status: self._on_exit(sandbox, pid, status)
        )
        sandbox.init.closed.add_done_callback(lambda _: self._on_init_closed(sandbox))
        # The supervisor exits once PID 1 exists, and no caller waits for its reap.
        self.spawner.forget_reap(slot.pid)
        await sandbox.init.start(runtime_spec)

    async def _apply_request(self, sandbox: _Sandbox) -> None:
        """Apply what the request adds to a set-up sandbox: limits and policy."""
        assert sandbox.cgroup is not None and self.network is not None
        spec = sandbox.info.spec
        memory_bytes = spec.memory_mib * 1024 * 1024 if spec.memory_mib else None
        limits = cgroups.CgroupLimits(
            cpu=spec.cpu,
            memory_bytes=memory_bytes,
            pids=spec.pids + HELPER_PIDS,
            cpu_weight=cgroups.DEFAULT_CPU_WEIGHT,
        )
        sandbox.cgroup.set_limits(limits)
        if spec.disk_mib != sandbox.disk_mib:
            self.layers.limit(sandbox.info.sandbox_id, spec.disk_mib)
            sandbox.disk_mib = spec.disk_mib
        policy = NetworkPolicy(spec.block_network, spec.allow_list)
        if sandbox.attachment is not None and policy != sandbox.policy:
            # Nothing has run in the sandbox, so it has no connections to cut.
            await asyncio.get_running_loop().run_in_executor(
                None,
                functools.partial(
                    self.network.update,
                    sandbox.info.sandbox_id,
                    sandbox.attachment,
                    policy,
                    cut_connections=False,
                ),
            )
            sandbox.policy = policy

    def _on_init_closed(self, sandbox: _Sandbox) -> None:
        if sandbox.info.state == SandboxState.RUNNING and not sandbox.lock.locked():
            log.error("sandbox %s: PID 1 exited unexpectedly", sandbox.info.sandbox_id)
            self._background(self._terminate(sandbox, TerminationReason.ERROR))
        elif self.warm is not None:
            self.warm.evict(sandbox)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` as a task that close() waits for."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_info(self, sandbox: _Sandbox, **changes: object) -> None:
        terminated = sandbox.info.state != SandboxState.TERMINATED and (
            changes.get("state") == SandboxState.TERMINATED
        )
        sandbox.info = replace(sandbox.info, **changes)
        if terminated:
            self._terminated.append(sandbox.info.sandbox_id)
        if self.store is not None:
            self.store.put_sandbox(sandbox.info)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Write the store's buffered rows STORE_FLUSH_SECONDS from now."""
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(STORE_FLUSH_SECONDS, self._flush_store)

    def _flush_store(self) -> None:
        self._flush = None
        if self.store is None:
            return
        try:
            self.store.flush()
        except sqlite3.Error as error:
            log.error(
                "writing sandbox state to %s failed: %s",
                self.config.database_path,
                error,
            )

    def _check_started(self) -> None:
        if not self._started:
            raise Unavailable(
                "the engine is not started; call `await engine.start()` first"
            )

    def _get(self, sandbox_id: str) -> _Sandbox:
        """Return the sandbox, if it belongs to the current workspace."""
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None or sandbox.info.workspace != current_workspace():
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
        workspace = current_workspace()
        for sandbox in self.sandboxes.values():
            info = sandbox.info
            if info.workspace != workspace:
                continue
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
        """End every process of the sandbox, then free its resources in the background.

        The sandbox is TERMINATED once no process of it is left. Removing its
        cgroups, layer, veth pair and chain takes from one to tens of ms (a
        veth's removal waits for RCU grace periods), so ``settle`` and
        ``close`` wait for it and terminate does not.
        """
        async with sandbox.lock:
            if sandbox.info.state == SandboxState.TERMINATED:
                return
            await self._stop(sandbox)
            self._set_info(
                sandbox,
                state=SandboxState.TERMINATED,
                reason=reason,
                terminated_at=time.time(),
            )
        log.info("sandbox %s terminated (%s)", sandbox.info.sandbox_id, reason.value)
        self._background(self._free(sandbox))
        self._forget_old_sandboxes()

    async def settle(self) -> None:
        """Wait until the background work of terminations has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _forget_old_sandboxes(self) -> None:
        """Keep at most MAX_REMEMBERED_SANDBOXES terminated sandboxes in memory."""
        while len(self._terminated) > MAX_REMEMBERED_SANDBOXES:
            sandbox_id = self._terminated.popleft()
            sandbox = self.sandboxes.get(sandbox_id)
            if sandbox is not None and sandbox.info.state == SandboxState.TERMINATED:
                del self.sandboxes[sandbox_id]

    async def _release(self, sandbox: _Sandbox) -> None:
        """Kill every process of the sandbox and free everything it holds."""
        await self._stop(sandbox)
        await self._free(sandbox)

    async def _stop(self, sandbox: _Sandbox) -> None:
        """Kill every process of the sandbox and close what reaches into it.

        Afterwards no code of the sandbox runs, its exposed ports and volume
        mounts are gone, and its output is released.
        """
        loop = asyncio.get_running_loop()
        init = sandbox.init
        if init is not None:
            with contextlib.suppress(ConnectionError, OSError):
                init.terminate()
        # The bucket mounts go at once: a process blocked in a read from a
        # stalled bucket dies only once its FUSE connection is aborted, and
        # PID 1 cannot exit before it. _free waits for these.
        sandbox.fuse_stops = [
            loop.run_in_executor(self._fuse_executor, self.fuse.stop, name)
            for name in sandbox.fuse_servers
        ]
        if init is not None:
            await self._kill_all(sandbox, init)
        # File workers are outside the sandbox's PID namespace, out of PID 1's
        # reach, and a search may run for as long as its pattern backtracks.
        for pid in sandbox.file_workers:
            with contextlib.suppress(ConnectionError, OSError):
                self.spawner.kill(pid)
        now = time.time()
        for process in sandbox.processes.values():
            if process.stdin_fd is not None:
                self._close_stdin(process)
            if not process.exited.is_set():
                process.killed = True
                self._finish(sandbox, process, -signals.SIGKILL, now)
        # The processes are gone, so paused pipes drain to EOF and close.
        sandbox.output_rate.lift()
        for timer, resume in list(sandbox.paused_readers.values()):
            timer.cancel()
            resume()
        # Output of a terminated sandbox is not kept: readers see it as dropped.
        sandbox.output.release()
        await self._close_forwarders(sandbox)
        # Every process of the sandbox is gone, so are its volume mounts.
        for users in self._volume_users.values():
            users.discard(sandbox.info.sandbox_id)

    async def _free(self, sandbox: _Sandbox) -> None:
        """Remove the cgroups, layer and network of a sandbox with no process left.

        A failure here must not keep the sandbox RUNNING: the sweep at the
        next start removes whatever is left.
        """
        if sandbox.init is not None:
            await self._end_init(sandbox, sandbox.init)
        fuse_stops, sandbox.fuse_stops = sandbox.fuse_stops, []
        for name, result in zip(
            sandbox.fuse_servers,
            await asyncio.gather(*fuse_stops, return_exceptions=True),
            strict=False,
        ):
            if isinstance(result, Exception):
                log.error(
                    "sandbox %s: FUSE server %s not stopped: %s",
                    sandbox.info.sandbox_id,
                    name,
                    result,
                )
        if sandbox.cgroup is not None:
            await self._destroy_cgroup(sandbox, sandbox.cgroup)
        await self._remove_layer(sandbox)
        await self._release_network(sandbox)

    async def _destroy_cgroup(self, sandbox: _Sandbox, cgroup: cgroups.Cgroup) -> None:
        """Remove a sandbox's cgroup, on the event loop unless a task is left in it.

        PID 1 and so every process of the PID namespace have exited, so the
        group is usually empty and goes with one rmdir per hierarchy. In a
        thread the removal cost the daemon about 0.3 ms more CPU (thread
        wakeups and GIL handoffs), measured with 4 clients of
        benchmarks.engines.GrpcRuns.throughput on a 2-core VM. A group
        that still has a task, such as a file worker that is still exiting,
        goes to a thread, where destroy signals the task and waits.

        NOTE: rmdir waits for the kernel's cgroup_mutex. A move into a v1
        memory cgroup can hold it across an RCU grace period, so this stalls
        the loop for up to about 20 ms now and then (p99 10 ms in that run).
        """
        try:
            try:
                cgroup.destroy(timeout=0)
            except DeadlineExceeded:
                await asyncio.get_running_loop().run_in_executor(None, cgroup.destroy)
        except (EngineError, OSError) as error:
            log.error(
                "sandbox %s: cgroup not removed: %s", sandbox.info.sandbox_id, error
            )

    async def _kill_all(self, sandbox: _Sandbox, init: InitClient) -> None:
        """Wait until PID 1 has sent SIGKILL to every other process of the sandbox.

        A process with SIGKILL pending runs no more code of its own. If PID 1
        does not answer, it is SIGKILLed itself, which kills the namespace.
        """
        try:
            async with asyncio.timeout(TERMINATE_TIMEOUT):
                await asyncio.shield(init.killed)
        except TimeoutError:
            log.warning(
                "sandbox %s: PID 1 did not answer terminate in %g s; killing it",
                sandbox.info.sandbox_id,
                TERMINATE_TIMEOUT,
            )
            if init.pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signals.pidfd_send_signal(init.pidfd, signals.SIGKILL)
            init.channel.close()

    async def _end_init(self, sandbox: _Sandbox, init: InitClient) -> None:
        """Wait until PID 1 has exited after terminate, SIGKILLing it if it hangs."""
        hung = False
        try:
            async with asyncio.timeout(TERMINATE_TIMEOUT):
                await asyncio.shield(init.closed)
        except TimeoutError:
            log.warning(
                "sandbox %s: PID 1 did not exit in %g s; killing it",
                sandbox.info.sandbox_id,
                TERMINATE_TIMEOUT,
            )
            init.channel.close()
            hung = True
        if init.pidfd is not None:
            grace = 0.0 if hung else TERMINATE_TIMEOUT
            await _end_process(init.pidfd, sandbox.info.sandbox_id, grace)
            os.close(init.pidfd)
            init.pidfd = None

    async def _close_forwarders(self, sandbox: _Sandbox) -> None:
        """Stop the sandbox's exposed-port forwarders."""
        loop = asyncio.get_running_loop()
        forwarders = list(sandbox.forwarders.values())
        sandbox.forwarders.clear()
        for forwarder in forwarders:
            # close() joins the forwarder's accept thread.
            await loop.run_in_executor(None, forwarder.close)
        if sandbox.info.urls:
            self._set_info(sandbox, urls={})

    async def _release_network(self, sandbox: _Sandbox) -> None:
        """Remove the sandbox's chain and veth pair, then let its namespace go.

        The namespace fd stays open until the veth pair is gone. Closing it
        first would let the kernel delete the pair on its own at any moment,
        and detach needs the host end's packet count.
        """
        loop = asyncio.get_running_loop()
        attachment, sandbox.attachment = sandbox.attachment, None
        try:
            if attachment is None or self.network is None:
                return
            if sandbox.policy is not None:
                await loop.run_in_executor(
                    None, self.network.remove, sandbox.info.sandbox_id, attachment
                )
            else:
                await loop.run_in_executor(None, self.network.detach, attachment)
        except (EngineError, OSError) as error:
            # The sweep at the next start removes the table and every veth.
            log.error(
                "sandbox %s: network not removed: %s", sandbox.info.sandbox_id, error
            )
        finally:
            if sandbox.netns_fd is not None:
                os.close(sandbox.netns_fd)
                sandbox.netns_fd = None

    def _policy(self, spec: SandboxSpec) -> NetworkPolicy:
        """Return the sandbox's policy, the daemon's default applied."""
        policy = check_policy(spec.block_network, spec.allow_list)
        if self.config.block_network_by_default and not policy.allow_list:
            return NetworkPolicy(block=True)
        return policy

    # Network.

    async def update_network_permissions(
        self,
        sandbox_id: str,
        *,
        block_network: bool = False,
        allow_list: tuple[str, ...] | list[str] = (),
    ) -> SandboxInfo:
        """Replace the sandbox's egress policy, for open connections too."""
        sandbox = self._get_running(sandbox_id)
        policy = check_policy(block_network, tuple(allow_list))
        async with sandbox.lock:
            sandbox = self._get_running(sandbox_id)
            attachment = sandbox.attachment
            if attachment is None and not policy.block:
                raise FailedPrecondition(
                    f"sandbox {sandbox_id} was created with block_network and has "
                    "no interface but loopback; create a new sandbox for egress"
                )
            if attachment is not None:
                assert self.network is not None
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(
                    None, self.network.update, sandbox_id, attachment, policy
                )
                sandbox.policy = policy
            spec = replace(
                sandbox.info.spec,
                block_network=policy.block,
                allow_list=policy.allow_list,
            )
            self._touch(sandbox)
            self._set_info(sandbox, spec=spec)
        log.info(
            "sandbox %s: network policy now %s",
            sandbox_id,
            "blocked" if policy.block else (", ".join(policy.allow_list) or "open"),
        )
        return sandbox.info

    async def expose_port(self, sandbox_id: str, port: int) -> str:
        """Forward a new TCP port of the host to ``port`` inside; return its URL."""
        sandbox = self._get_running(sandbox_id)
        if (
            isinstance(port, bool)
            or not isinstance(port, int)
            or not 1 <= port <= 65535
        ):
            raise InvalidArgument(f"port {port!r} must be an integer from 1 to 65535")
        self._touch(sandbox)
        # Under the lock, so a terminate in progress cannot miss the forwarder.
        async with sandbox.lock:
            sandbox = self._get_running(sandbox_id)
            existing = sandbox.forwarders.get(port)
            if existing is not None:
                return existing.url
            # Each forwarder uses a thread and a listening socket of the daemon.
            if len(sandbox.forwarders) >= MAX_EXPOSED_PORTS:
                raise ResourceExhausted(
                    f"sandbox {sandbox_id} already exposes {MAX_EXPOSED_PORTS} ports,"
                    " the maximum; serve more through one port"
                )
            assert sandbox.netns_fd is not None
            try:
                forwarder = PortForwarder(
                    sandbox.netns_fd,
                    port,
                    self.config.expose_host,
                    sandbox_id,
                    network=self.network,
                    attachment=sandbox.attachment,
                )
            except OSError as error:
                raise Unavailable(
                    f"cannot listen on {self.config.expose_host} for port {port} "
                    f"of sandbox {sandbox_id}: {_os_message(error)}"
                ) from error
            sandbox.forwarders[port] = forwarder
            self._set_info(sandbox, urls={**sandbox.info.urls, port: forwarder.url})
        log.info("sandbox %s: port %d exposed at %s", sandbox_id, port, forwarder.url)
        return forwarder.url

    async def list_urls(self, sandbox_id: str) -> dict[int, str]:
        """Return exposed port -> URL for the sandbox."""
        return dict(self._get(sandbox_id).info.urls)

    async def _remove_layer(self, sandbox: _Sandbox) -> None:
        """Delete the sandbox's layer, or remove its files if that fails.

        Deleting the subvolume evicts the dentries and inodes cached for the
        layer's files, which took 27 ms for 10,000 files and 0.4 s for
        100,000 on a 2-core VM, so a large layer is deleted in a thread. A
        small one, such as that of a sandbox that wrote few files, is deleted
        on the loop, which saves the thread hop and its CPU time.
        """
        loop = asyncio.get_running_loop()
        sandbox_id = sandbox.info.sandbox_id
        if self.layers.is_small(sandbox_id):
            deleted = self._delete_layer(sandbox_id)
        else:
            deleted = await loop.run_in_executor(None, self._delete_layer, sandbox_id)
        if not deleted:
            # rm runs as a subprocess, and the tree may be large.
            await loop.run_in_executor(None, remove_tree, self.layers.path / sandbox_id)

    def _delete_layer(self, sandbox_id: str) -> bool:
        """Delete the sandbox's subvolume; False if files of it may be left."""
        try:
            return self.layers.remove(sandbox_id)
        except OSError as error:
            log.error(
                "sandbox %s: layer not deleted, removing its files instead: %s",
                sandbox_id,
                error,
            )
            return False

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

    # Secrets.

    def _resolve_secrets(self, names: tuple[str, ...]) -> dict[str, str]:
        if not names:
            return {}
        self._check_started()
        assert self.secrets is not None
        return self.secrets.resolve(names)

    async def create_secret(
        self, name: str, value: str, *, overwrite: bool = False
    ) -> tuple[SecretInfo, bool]:
        """Store secret ``name``; return it and whether this call created it."""
        self._check_started()
        assert self.secrets is not None
        info, created = self.secrets.create(name, value, overwrite=overwrite)
        log.info("secret %s %s", name, "created" if created else "replaced")
        return info, created

    async def list_secrets(self) -> list[SecretInfo]:
        """Return every secret's name and times, never a value."""
        self._check_started()
        assert self.secrets is not None
        return self.secrets.list()

    async def delete_secret(self, name: str) -> None:
        self._check_started()
        assert self.secrets is not None
        self.secrets.delete(name)
        log.info("secret %s deleted", name)

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
            self._volume_users.setdefault(_volume_key(mount.name), set()).add(
                sandbox_id
            )
            info, created = self.volumes.create(mount.name)
            if created:
                log.info("sandbox %s: created volume %s", sandbox_id, mount.name)
            mounts.append(
                {
                    "source": str(self.volumes.data_path(mount.name)),
                    "target": mount.mount_path,
                    "read_only": mount.read_only,
                    "volume": mount.name,
                    "url": info.url,
                }
            )
        return mounts

    async def _mounts(self, sandbox: _Sandbox) -> list[dict[str, object]]:
        """Return the volume and bucket mounts, parents first, with FUSE running."""
        mounts = self._acquire_volumes(sandbox)
        for mount in mounts:
            url = mount.pop("url")
            if url:
                mount["source"] = await self._volume_server(str(mount["volume"]))
            mount.pop("volume")
        spec = sandbox.info.spec
        loop = asyncio.get_running_loop()
        for index, bucket in enumerate(spec.cloud_buckets):
            name = f"{sandbox.info.sandbox_id}-bucket{index}"
            access_key, secret_key = sandbox.bucket_keys[index]
            prefix = fuse.check_key_prefix(bucket.config.key_prefix or "")
            config = MountConfig(
                url=f"s3://{bucket.name}/{prefix}" if prefix else f"s3://{bucket.name}",
                mountpoint="",
                cache_dir="",
                uid=self.config.uid_base,
                gid=self.config.uid_base,
                read_only=bucket.config.read_only,
                s3=_s3_options(bucket.config, access_key, secret_key),
                fsname=f"engine-bucket-{bucket.name}",
            )
            sandbox.fuse_servers.append(name)
            try:
                server = await loop.run_in_executor(
                    self._fuse_executor, self.fuse.start, name, config
                )
            except FailedPrecondition as error:
                raise FailedPrecondition(
                    f"cloud bucket {bucket.name!r} at {bucket.mount_path}: {error}"
                ) from None
            mounts.append(
                {
                    "source": str(server.mountpoint),
                    "target": bucket.mount_path,
                    "read_only": bucket.config.read_only,
                }
            )
        return sorted(mounts, key=lambda mount: str(mount["target"]).count("/"))

    async def _volume_server(self, name: str) -> str:
        """Start volume ``name``'s FUSE server unless it runs; return its mount."""
        server_name = _volume_server_name(name)
        lock = self._fuse_locks.setdefault(server_name, asyncio.Lock())
        async with lock:
            server = self.fuse.servers.get(server_name)
            if server is not None and server.process.poll() is None:
                return str(server.mountpoint)
            loop = asyncio.get_running_loop()
            if server is not None:
                log.warning("FUSE server of volume %s exited; starting a new one", name)
                await loop.run_in_executor(
                    self._fuse_executor, self.fuse.stop, server_name
                )
            fields = self.volumes.metadata(name)
            settings = CloudBucketConfig(**dict(fields.get("s3") or {}))  # type: ignore[arg-type]
            access_key, secret_key = self._bucket_keys(settings)
            config = MountConfig(
                url=str(fields["url"]),
                mountpoint="",
                cache_dir="",
                uid=self.config.uid_base,
                gid=self.config.uid_base,
                s3=_s3_options(settings, access_key, secret_key),
                fsname=f"engine-volume-{name}",
            )
            try:
                server = await loop.run_in_executor(
                    self._fuse_executor, self.fuse.start, server_name, config
                )
            except FailedPrecondition as error:
                raise FailedPrecondition(f"volume {name!r}: {error}") from None
            return str(server.mountpoint)

    def _bucket_keys(self, config: CloudBucketConfig) -> tuple[str, str]:
        """Look up the access and secret key that ``config`` names, or ("", "")."""
        if not config.access_key:
            return "", ""
        values = self._resolve_secrets((config.access_key, config.secret_key))
        return values[config.access_key], values[config.secret_key]

    def _check_volume_backends(self, spec: SandboxSpec) -> None:
        """Raise NotFound for an fsspec volume that names a missing secret."""
        for mount in spec.volumes:
            with contextlib.suppress(NotFound):
                fields = self.volumes.metadata(mount.name)
                if fields.get("url"):
                    settings = dict(fields.get("s3") or {})
                    self._bucket_keys(CloudBucketConfig(**settings))  # type: ignore[arg-type]

    def _with_users(self, info: VolumeInfo) -> VolumeInfo:
        users = tuple(sorted(self._volume_users.get(_volume_key(info.name), ())))
        return replace(info, sandbox_ids=users)

    async def create_volume(
        self, name: str, url: str = "", s3: CloudBucketConfig | None = None
    ) -> tuple[VolumeInfo, bool]:
        """Create volume ``name`` unless it exists; return it and whether it is new.

        ``url`` is an fsspec URL (s3:// or memory://) for a FUSE-backed volume,
        with ``s3`` the connection settings of an s3:// URL.
        """
        self._check_started()
        settings = s3 or CloudBucketConfig()
        check_outbound_url("volume endpoint", settings.endpoint, self.outbound_allowed)
        if url:
            protocol, _ = fuse.parse_url(url)
            validation.check_volume_backend(protocol, settings)
            # Fails now, with NotFound, rather than at the first mount.
            self._bucket_keys(settings)
        elif settings != CloudBucketConfig():
            raise InvalidArgument(
                f"volume {name!r}: s3 settings need an s3:// url; pass url too"
            )
        s3_fields = {
            "endpoint": settings.endpoint,
            "region": settings.region,
            "access_key": settings.access_key,
            "secret_key": settings.secret_key,
            "force_path_style": settings.force_path_style,
        }
        info, created = self.volumes.create(name, url, s3_fields if url else None)
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
        users = sorted(self._volume_users.get(_volume_key(name), ()))
        if users:
            raise FailedPrecondition(
                f"volume {name!r} is mounted by sandbox {', '.join(users)};"
                " terminate those sandboxes first"
            )
        # Detaching is one rename, done before any await, so no sandbox can
        # start to mount the volume between the check above and here.
        trash = self.volumes.detach(name)
        self._volume_users.pop(_volume_key(name), None)
        loop = asyncio.get_running_loop()
        if _volume_server_name(name) in self.fuse.servers:
            await loop.run_in_executor(
                self._fuse_executor, self.fuse.stop, _volume_server_name(name)
            )
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
        secrets: tuple[str, ...] | list[str] = (),
    ) -> ProcessInfo:
        """Start ``argv`` in the sandbox (no shell) and return once it runs.

        The environment is, from lowest to highest precedence: the engine's
        defaults, the spec's env, the sandbox's secrets, ``env``, and the
        values of the secrets named in ``secrets``.
        """
        sandbox = self._get_running(sandbox_id)
        spec = sandbox.info.spec
        cwd = cwd or spec.workdir
        env = env or {}
        validation.check_exec(argv, cwd, env, timeout)
        secret_names = validation.check_secret_names("secrets", secrets)
        exec_secrets = self._resolve_secrets(secret_names)
        full_env = {
            "PATH": DEFAULT_PATH,
            "HOME": "/root",
            "HOSTNAME": sandbox_id,
            "LANG": "C.UTF-8",
        }
        full_env.update(spec.env)
        full_env.update(sandbox.secret_env)
        full_env.update(env)
        full_env.update(exec_secrets)
        validation.check_exec_size(argv, full_env)
        self._touch(sandbox)
        assert sandbox.init is not None and sandbox.cgroup is not None
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
            pid = await sandbox.init.exec(
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
                raise _exec_error(sandbox_id, argv, spec.pids, error) from error
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
        self._attach_reader(sandbox, stdout_read, process.stdout)
        self._attach_reader(sandbox, stderr_read, process.stderr)
        old = sandbox.processes.get(pid)
        if old is not None:
            sandbox.finished.append(old.info())
            del sandbox.finished[:-MAX_FINISHED_PROCESSES]
        sandbox.processes[pid] = process
        if len(sandbox.processes) > MAX_KEPT_PROCESSES + EVICTION_BATCH:
            _evict_exited(sandbox)
        if timeout is not None and timeout > 0:
            loop = asyncio.get_running_loop()
            process.timer = loop.call_later(timeout, self._on_timeout, sandbox, process)
        assert self.store is not None
        info = process.info()
        self.store.put_process(sandbox_id, info)
        self._schedule_flush()
        # Only when the line is written: joining and shortening a long argv
        # costs more than the rest of the log call.
        if log.isEnabledFor(logging.INFO):
            log.info(
                "sandbox %s: started pid %d: %s",
                sandbox_id,
                pid,
                validation.shorten(" ".join(argv)),
            )
        return info

    def _attach_reader(self, sandbox: _Sandbox, fd: int, buffer: OutputBuffer) -> None:
        """Read ``fd`` into ``buffer`` until EOF, at most at the output rate."""
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
                # Each read costs at least READ_COST_BYTES, so a process that
                # writes one byte at a time cannot make the daemon read in a
                # busy loop: its pipe fills while the reader waits.
                delay = sandbox.output_rate.take(max(len(data), READ_COST_BYTES))
                if delay > 0:
                    loop.remove_reader(fd)
                    timer = loop.call_later(delay, resume)
                    sandbox.paused_readers[fd] = (timer, resume)
                return
            loop.remove_reader(fd)
            os.close(fd)
            buffer.close()

        def resume() -> None:
            sandbox.paused_readers.pop(fd, None)
            loop.add_reader(fd, readable)

        loop.add_reader(fd, readable)

    def _on_timeout(self, sandbox: _Sandbox, process: _Process) -> None:
        if process.exited.is_set() or sandbox.init is None:
            return
        process.timed_out = True
        log.info(
            "sandbox %s: pid %d timed out; killing its process group",
            sandbox.info.sandbox_id,
            process.pid,
        )
        with contextlib.suppress(ConnectionError, OSError):
            sandbox.init.kill(process.pid, signals.SIGKILL, group=True)

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
        waiters, process.exit_waiters = process.exit_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        # An exited process reads no more input, so its stdin pipe is closed now.
        self._close_stdin(process)
        if self.store is not None:
            self.store.put_process(sandbox.info.sandbox_id, process.info())
            self._schedule_flush()
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
            raise NotFound(
                f"process {pid} not found in sandbox {sandbox_id}; the engine keeps"
                f" the output of the last {MAX_KEPT_PROCESSES} exited processes"
            )
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
            # Every byte buffered now, in chunks, and nothing written later.
            end = buffer.end
            while True:
                chunk = buffer.read(offset)
                yield chunk
                offset = chunk.offset + len(chunk.data)
                if chunk.eof or not chunk.data or offset >= end:
                    return
        async for chunk in buffer.follow(offset):
            yield chunk

    async def follow_process(
        self, sandbox_id: str, pid: int
    ) -> AsyncIterator[OutputChunk | ProcessInfo]:
        """Yield the process's stdout and stderr from the start, then its ProcessInfo.

        Chunks come as they arrive, at most one per stream per wake-up. The
        output ends when both streams reach EOF. If a background child keeps a
        pipe open, it ends OUTPUT_GRACE_SECONDS after the exit instead, with the
        bytes buffered until then. The last item is the exited process's
        ProcessInfo.
        """
        _, process = self._process(sandbox_id, pid)
        loop = asyncio.get_running_loop()
        buffers = [process.stdout, process.stderr]
        offsets = {buffer.stream: 0 for buffer in buffers}
        deadline: float | None = None
        while buffers:
            progressed = False
            for buffer in list(buffers):
                chunk = buffer.read(offsets[buffer.stream])
                if chunk.data or chunk.dropped:
                    offsets[buffer.stream] = chunk.offset + len(chunk.data)
                    progressed = True
                    yield chunk
                if chunk.eof:
                    buffers.remove(buffer)
                    progressed = True
            if progressed:
                continue
            remaining = None
            if process.exited.is_set():
                if deadline is None:
                    deadline = loop.time() + OUTPUT_GRACE_SECONDS
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
            await _next_change(loop, process, buffers, remaining)
        if not process.exited.is_set():
            await process.exited.wait()
        yield process.info()

    async def finish_process(
        self, sandbox_id: str, pid: int
    ) -> tuple[ProcessInfo, OutputBuffer, OutputBuffer]:
        """Wait until the process has exited and its output has ended.

        The output ends as in ``follow_process``: at both EOFs, or at most
        OUTPUT_GRACE_SECONDS after the exit. Returns the ProcessInfo and the
        stdout and stderr buffers.
        """
        _, process = self._process(sandbox_id, pid)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            open_buffers = [b for b in (process.stdout, process.stderr) if not b.closed]
            remaining = None
            if process.exited.is_set():
                if not open_buffers:
                    break
                if deadline is None:
                    deadline = loop.time() + OUTPUT_GRACE_SECONDS
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
            await _next_change(loop, process, open_buffers, remaining)
        return process.info(), process.stdout, process.stderr

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
            async with asyncio.timeout(timeout):
                await self._settled(process)
        return process.info()

    async def _settled(self, process: _Process) -> None:
        await process.exited.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OUTPUT_GRACE_SECONDS):
                await _closed(process)

    async def kill(
        self, sandbox_id: str, pid: int, signal: int = signals.SIGKILL
    ) -> None:
        sandbox, process = self._process(sandbox_id, pid)
        if signal not in signals.valid_signals() or signal == 0:
            raise InvalidArgument(f"signal {signal} is not a valid signal number")
        if process.exited.is_set():
            return
        self._get_running(sandbox_id)
        _signal_group(sandbox, process, signal)

    def kill_abandoned(self, sandbox_id: str, pid: int) -> None:
        """SIGKILL the group of a process whose caller went away without its pid.

        Does nothing if the process or its sandbox has already ended.
        """
        sandbox = self.sandboxes.get(sandbox_id)
        process = sandbox.processes.get(pid) if sandbox is not None else None
        if process is None or process.exited.is_set() or sandbox is None:
            return
        if sandbox.init is None or sandbox.info.state != SandboxState.RUNNING:
            return
        with contextlib.suppress(ConnectionError, OSError):
            _signal_group(sandbox, process, signals.SIGKILL)

    async def list_processes(self, sandbox_id: str) -> list[ProcessInfo]:
        sandbox = self._get(sandbox_id)
        infos = sandbox.finished + [
            process.info() for process in sandbox.processes.values()
        ]
        return sorted(infos, key=lambda info: info.started_at)


def _evict_exited(sandbox: _Sandbox) -> None:
    """Forget the oldest exited processes beyond MAX_KEPT_PROCESSES.

    Each one goes to the finished list as a ProcessInfo, and its output
    bytes leave the sandbox's budget. A process whose output has not ended,
    because a background child keeps a pipe open, stays.
    """
    excess = len(sandbox.processes) - MAX_KEPT_PROCESSES
    for pid, process in list(sandbox.processes.items()):
        if excess <= 0:
            break
        if not process.exited.is_set():
            continue
        if not (process.stdout.closed and process.stderr.closed):
            continue
        del sandbox.processes[pid]
        for buffer in (process.stdout, process.stderr):
            buffer.drop_front(buffer.held)
        sandbox.finished.append(process.info())
        excess -= 1
    del sandbox.finished[:-MAX_FINISHED_PROCESSES]


def _signal_group(sandbox: _Sandbox, process: _Process, signal: int) -> None:
    """Send ``signal`` to the process group of ``process`` and mark it killed."""
    assert sandbox.init is not None
    process.killed = True
    sandbox.init.kill(process.pid, signal, group=True)
    log.info(
        "sandbox %s: sent signal %d to process group %d",
        sandbox.info.sandbox_id,
        signal,
        process.pid,
    )


async def _next_change(
    loop: asyncio.AbstractEventLoop,
    process: _Process,
    buffers: list[OutputBuffer],
    timeout: float | None,
) -> None:
    """Wait until one of ``buffers`` changes, the process exits, or ``timeout``."""
    waiter: asyncio.Future[None] = loop.create_future()
    for buffer in buffers:
        buffer.add_waiter(waiter)
    if not process.exited.is_set():
        process.exit_waiters.append(waiter)
    try:
        async with asyncio.timeout(timeout):
            await waiter
    except TimeoutError:
        pass
    finally:
        waiter.cancel()
        for buffer in buffers:
            buffer.remove_waiter(waiter)
        with contextlib.suppress(ValueError):
            process.exit_waiters.remove(waiter)


async def _end_process(pidfd: int, sandbox_id: str, grace: float) -> None:
    """Wait until the process of ``pidfd`` has exited, SIGKILLing it after ``grace`` s.

    A pidfd reads as readable once its process has exited, reaped or not.
    """
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
    try:
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(exited)
            return
        except TimeoutError:
            if grace > 0:
                log.warning("sandbox %s: PID 1 did not exit; killing it", sandbox_id)
        with contextlib.suppress(ProcessLookupError):
            signals.pidfd_send_signal(pidfd, signals.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TERMINATE_TIMEOUT):
                await asyncio.shield(exited)
    finally:
        loop.remove_reader(pidfd)


async def _closed(process: _Process) -> None:
    for buffer in (process.stdout, process.stderr):
        async for chunk in buffer.follow(buffer.end):
            if chunk.eof:
                break


def _directory_identity(path: Path) -> tuple[int, int, int] | None:
    """Return the device, inode and ctime of ``path``, or None if it is missing."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_ctime_ns


def _os_message(error: OSError) -> str:
    """Return an OSError's text without the "[Errno N]" prefix."""
    if error.strerror:
        if error.filename is not None:
            return f"{error.filename!r}: {error.strerror}"
        return error.strerror
    return str(error)


def _s3_options(
    config: CloudBucketConfig, access_key: str, secret_key: str
) -> S3Options:
    return S3Options(
        endpoint=config.endpoint,
        region=config.region,
        access_key=access_key,
        secret_key=secret_key,
        force_path_style=config.force_path_style,
    )


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
    sandbox_id: str, argv: list[str], pids: int, error: BaseException
) -> EngineError:
    if isinstance(error, ConnectionError):
        return FailedPrecondition(
            f"sandbox {sandbox_id} stopped while starting {argv[0]!r}"
        )
    code = getattr(error, "errno", 0)
    message = _ERRNO_MESSAGE.sub(
        "", str(error.args[1] if len(error.args) > 1 else error)
    )
    # engine-init quotes the path or program it failed on, which can be long.
    message = validation.shorten(message, MAX_EXEC_ERROR_CHARS)
    if code in (2, 20):  # ENOENT, ENOTDIR
        return NotFound(message)
    if code == 11:  # EAGAIN from clone: the pids cgroup is full
        return ResourceExhausted(
            f"cannot start {argv[0]!r} in sandbox {sandbox_id}: it runs its"
            f" maximum of {pids} processes; wait for some to exit, kill them,"
            " or create the sandbox with a larger pids limit"
        )
    if code in (12, 24):  # ENOMEM, EMFILE
        return ResourceExhausted(
            f"cannot start {argv[0]!r} in sandbox {sandbox_id}: {message}"
        )
    if code in (1, 13):
        return PermissionDenied(message)
    return InvalidArgument(message)


def _volume_key(name: str) -> str:
    """Return the key of volume ``name`` of the current workspace in _volume_users."""
    return f"{current_workspace()}/{name}"


def _volume_server_name(name: str) -> str:
    """Return the FUSE server name of fsspec volume ``name`` of the workspace."""
    workspace = current_workspace()
    if workspace == DEFAULT_WORKSPACE:
        return f"volume-{name}"
    return f"volume-{name}@{workspace}"
