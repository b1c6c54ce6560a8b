"""Cgroup v2 driver over the unified hierarchy's cpu, memory and pids controllers.

The engine root is a child of the cgroup this process runs in and contains
no processes itself, so the driver may enable cpu, memory and pids in its
cgroup.subtree_control. Enabling them there requires that the parent, the
daemon's own cgroup, already enables them in its own cgroup.subtree_control.
The driver never writes the parent's file.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from engine.errors import NotFound, Unavailable
from engine.runtime.cgroups import (
    CPU_PERIOD_US,
    Cgroup,
    CgroupDriver,
    CgroupLimits,
    CgroupStats,
    cpu_quota_us,
    ensure_dir,
    kill_tasks,
    list_groups,
    list_pids,
    make_cgroup_dir,
    read_int,
    read_keyed,
    read_text,
    remove_group_dirs,
    remove_roots,
    undo_create,
    validate_name,
    write_control,
)

logger = logging.getLogger(__name__)

V2_CONTROLLERS = ("cpu", "memory", "pids")

DirOperation = Callable[[str], None]


class CgroupV2(Cgroup):
    """One sandbox group in the unified hierarchy."""

    def __init__(
        self, name: str, directory: str, rmdir: DirOperation = os.rmdir
    ) -> None:
        self.name = name
        self.directory = directory
        self._rmdir = rmdir

    def __repr__(self) -> str:
        return f"CgroupV2({self.name!r}, {self.directory!r})"

    def _path(self, filename: str) -> str:
        return os.path.join(self.directory, filename)

    def set_limits(self, limits: CgroupLimits) -> None:
        _apply_limits(self.directory, limits)

    def procs_files(self) -> list[str]:
        return [self._path("cgroup.procs")]

    def stats(self) -> CgroupStats:
        current = read_int(self._path("memory.current"))
        try:
            peak = read_int(self._path("memory.peak"))
        except NotFound:
            peak = current  # memory.peak exists since Linux 5.19
        return CgroupStats(
            cpu_seconds=read_keyed(self._path("cpu.stat"), "usage_usec") / 1e6,
            memory_bytes=current,
            memory_peak_bytes=peak,
            pids=read_int(self._path("pids.current")),
        )

    def oom_kills(self) -> int:
        return read_keyed(self._path("memory.events"), "oom_kill")

    def pids(self) -> list[int]:
        return list_pids([self.directory])

    def kill_all(self, timeout: float = 5.0) -> None:
        self._kill(time.monotonic() + timeout)

    def _kill(self, deadline: float) -> None:
        # cgroup.kill (Linux 5.14) kills the whole subtree, including tasks
        # forked while it runs. The signal loop in kill_tasks covers older
        # kernels and waits until the tasks have left.
        kill_file = self._path("cgroup.kill")
        if os.path.exists(kill_file):
            write_control(kill_file, "1")
        kill_tasks(self.name, [self.directory], deadline)

    def destroy(self, timeout: float = 5.0) -> None:
        if os.path.isdir(self.directory):
            self._kill(time.monotonic() + timeout)
        if remove_group_dirs(self.name, [self.directory], timeout, self._rmdir):
            logger.info("destroyed cgroup %s (v2)", self.name)
        else:
            logger.debug("cgroup %s (v2) was already destroyed", self.name)


class CgroupV2Driver(CgroupDriver):
    """Driver that creates groups under one engine root in the unified hierarchy."""

    version = 2

    def __init__(
        self,
        root_dir: str,
        *,
        mkdir: DirOperation = os.mkdir,
        rmdir: DirOperation = os.rmdir,
    ) -> None:
        """Use the engine root ``root_dir``, whose parent is this process's cgroup.

        ``mkdir`` and ``rmdir`` create and remove cgroup directories. Tests
        replace them to run the driver on a plain directory tree, where they
        must also create and delete the control files that cgroupfs manages.
        """
        self.root_dir = root_dir
        self._mkdir = mkdir
        self._rmdir = rmdir

    def __repr__(self) -> str:
        return f"CgroupV2Driver({self.root_dir!r})"

    @property
    def root_dirs(self) -> list[str]:
        return [self.root_dir]

    def _group(self, name: str) -> CgroupV2:
        validate_name(name)
        return CgroupV2(name, os.path.join(self.root_dir, name), self._rmdir)

    def _ensure_root(self) -> None:
        parent = os.path.dirname(self.root_dir)
        parent_control = os.path.join(parent, "cgroup.subtree_control")
        delegated = set(read_text(parent_control).split())
        for controller in V2_CONTROLLERS:
            if controller not in delegated:
                # NOTE: the parent is the daemon's own cgroup. The kernel
                # rejects "+memory" in the subtree_control of a non-root cgroup
                # that has processes, and rejects moving a process into one
                # that has it, so this check passes only in the root cgroup.
                raise Unavailable(
                    f"cgroup v2 controller {controller!r} is not enabled in "
                    f"{parent_control}, so the engine cannot limit sandboxes "
                    f"under {self.root_dir}. The engine never writes that file. "
                    f"Enable it there as the owner of {parent} "
                    f"(echo +{controller} > {parent_control}), for example by "
                    "running the daemon under `systemd-run --scope -p "
                    "Delegate=yes`. The kernel accepts that write only while "
                    f"{parent} has no processes of its own, unless it is the "
                    "root cgroup."
                )

        ensure_dir(self.root_dir, self._mkdir)
        root_control = os.path.join(self.root_dir, "cgroup.subtree_control")
        enabled = set(read_text(root_control).split())
        if not set(V2_CONTROLLERS) <= enabled:
            write_control(root_control, " ".join(f"+{c}" for c in V2_CONTROLLERS))

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        group = self._group(name)
        self._ensure_root()

        made: list[str] = []
        try:
            make_cgroup_dir(group.directory, self._mkdir)
            made.append(group.directory)
            _apply_limits(group.directory, limits)
        except BaseException:
            undo_create(name, made, self._rmdir)
            raise
        logger.debug(
            "created cgroup %s (v2) at %s with %s", name, group.directory, limits
        )
        return group

    def open(self, name: str) -> Cgroup:
        group = self._group(name)
        if not os.path.isdir(group.directory):
            raise NotFound(f"cgroup {name} not found under {self.root_dir}")
        return group

    def list(self) -> list[str]:
        return list_groups(self.root_dirs)

    def remove_root(self) -> None:
        remove_roots(self.root_dirs, self._rmdir)


def _apply_limits(directory: str, limits: CgroupLimits) -> None:
    if limits.cpu is not None:
        quota = cpu_quota_us(limits.cpu)
        write_control(os.path.join(directory, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
    if limits.memory_bytes is not None:
        write_control(os.path.join(directory, "memory.max"), str(limits.memory_bytes))
        swap_max = os.path.join(directory, "memory.swap.max")
        # memory.swap.max is missing when the kernel has no swap accounting.
        if os.path.exists(swap_max):
            write_control(swap_max, "0")
    if limits.pids is not None:
        write_control(os.path.join(directory, "pids.max"), str(limits.pids))
    if limits.cpu_weight is not None:
        write_control(os.path.join(directory, "cpu.weight"), str(limits.cpu_weight))
