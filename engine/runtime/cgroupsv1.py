"""Cgroup v1 driver over the memory, cpu, cpuacct and pids controllers.

Each controller may sit in its own hierarchy or share one with others (for
example ``cpu,cpuacct``), and this process may be in a different cgroup in
each. A group therefore has one directory per distinct hierarchy, each under
that hierarchy's engine root.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from engine.errors import EngineError, InvalidArgument, NotFound, Unavailable
from engine.runtime.cgroups import (
    CPU_PERIOD_US,
    DEFAULT_CPU_WEIGHT,
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
    remove_group_dirs,
    remove_roots,
    undo_create,
    validate_name,
    write_control,
)

logger = logging.getLogger(__name__)

V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
# cpu.shares of a new v1 group, and the smallest value the kernel accepts.
DEFAULT_CPU_SHARES = 1024
MIN_CPU_SHARES = 2


def _distinct(dirs: Mapping[str, str]) -> list[str]:
    """Return the distinct values of ``dirs`` in V1_CONTROLLERS order."""
    result: list[str] = []
    for controller in V1_CONTROLLERS:
        if dirs[controller] not in result:
            result.append(dirs[controller])
    return result


class CgroupV1(Cgroup):
    """One sandbox group with a directory in each v1 hierarchy."""

    def __init__(self, name: str, dirs: Mapping[str, str]) -> None:
        self.name = name
        self.dirs = dict(dirs)  # controller -> directory of the group
        self.directories = _distinct(self.dirs)

    def __repr__(self) -> str:
        return f"CgroupV1({self.name!r}, {self.dirs!r})"

    def set_limits(self, limits: CgroupLimits) -> None:
        _apply_limits(self, limits)

    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.directories]

    def stats(self) -> CgroupStats:
        memory = self.dirs["memory"]
        usage_ns = read_int(os.path.join(self.dirs["cpuacct"], "cpuacct.usage"))
        return CgroupStats(
            cpu_seconds=usage_ns / 1e9,
            memory_bytes=read_int(os.path.join(memory, "memory.usage_in_bytes")),
            memory_peak_bytes=read_int(
                os.path.join(memory, "memory.max_usage_in_bytes")
            ),
            pids=read_int(os.path.join(self.dirs["pids"], "pids.current")),
        )

    def oom_kills(self) -> int:
        # The oom_kill line exists since Linux 4.13; read_keyed raises
        # Unavailable on older kernels.
        return read_keyed(
            os.path.join(self.dirs["memory"], "memory.oom_control"), "oom_kill"
        )

    def pids(self) -> list[int]:
        return list_pids(self.directories)

    def kill_all(self, timeout: float = 5.0) -> None:
        kill_tasks(self.name, self.directories, time.monotonic() + timeout)

    def destroy(self, timeout: float = 5.0) -> None:
        if remove_group_dirs(self.name, self.directories, timeout):
            logger.info("destroyed cgroup %s (v1)", self.name)
        else:
            logger.debug("cgroup %s (v1) was already destroyed", self.name)


class CgroupV1Driver(CgroupDriver):
    """Driver for groups in the v1 memory, cpu, cpuacct and pids hierarchies."""

    version = 1

    def __init__(self, root_dirs: Mapping[str, str]) -> None:
        """Use ``root_dirs``, which maps each of V1_CONTROLLERS to its engine root."""
        missing = [c for c in V1_CONTROLLERS if c not in root_dirs]
        if missing:
            raise InvalidArgument(f"engine root missing for controller {missing}")
        self._root_by_controller = {c: root_dirs[c] for c in V1_CONTROLLERS}

    def __repr__(self) -> str:
        return f"CgroupV1Driver({self._root_by_controller!r})"

    @property
    def root_dirs(self) -> list[str]:
        return _distinct(self._root_by_controller)

    def _group(self, name: str) -> CgroupV1:
        validate_name(name)
        dirs = {
            c: os.path.join(root, name) for c, root in self._root_by_controller.items()
        }
        return CgroupV1(name, dirs)

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        group = self._group(name)
        made: list[str] = []
        try:
            for directory in group.directories:
                try:
                    make_cgroup_dir(directory)
                except Unavailable:
                    # The engine's root goes with its last group at a stop or
                    # sweep, so it is made again on first use.
                    ensure_dir(os.path.dirname(directory))
                    make_cgroup_dir(directory)
                made.append(directory)
            _apply_limits(group, limits)
        except BaseException:
            undo_create(name, made)
            raise
        logger.debug(
            "created cgroup %s (v1) in %s with %s", name, group.directories, limits
        )
        return group

    def open(self, name: str) -> Cgroup:
        group = self._group(name)
        if not any(os.path.isdir(d) for d in group.directories):
            raise NotFound(f"cgroup {name} not found under {self.root_dirs}")
        return group

    def list(self) -> list[str]:
        return list_groups(self.root_dirs)

    def remove_root(self) -> None:
        remove_roots(self.root_dirs)


def _apply_limits(group: CgroupV1, limits: CgroupLimits) -> None:
    if limits.memory_bytes is not None:
        _limit_memory(group.dirs["memory"], limits.memory_bytes)
    if limits.cpu is not None:
        cpu = group.dirs["cpu"]
        write_control(os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
        write_control(
            os.path.join(cpu, "cpu.cfs_quota_us"), str(cpu_quota_us(limits.cpu))
        )
    if limits.pids is not None:
        write_control(os.path.join(group.dirs["pids"], "pids.max"), str(limits.pids))
    if limits.cpu_weight is not None:
        write_control(
            os.path.join(group.dirs["cpu"], "cpu.shares"),
            str(cpu_shares(limits.cpu_weight)),
        )


def cpu_shares(weight: int) -> int:
    """Convert a cpu.weight (default 100) to v1 cpu.shares (default 1024, min 2)."""
    return max(MIN_CPU_SHARES, weight * DEFAULT_CPU_SHARES // DEFAULT_CPU_WEIGHT)


_swap_warned = False


def _warn_swap_unlimited(memsw: str) -> None:
    """Log once per process that memory limits cannot cover swap on this host."""
    global _swap_warned
    if _swap_warned or not _host_has_swap():
        return
    _swap_warned = True
    logger.warning(
        "%s is missing (swap accounting is off), so sandboxes may use swap beyond "
        "their memory limit; boot with swapaccount=1 to limit it",
        memsw,
    )


def _host_has_swap() -> bool:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) > 0
    return False


def _limit_memory(directory: str, limit: int) -> None:
    # memory.limit_in_bytes comes first because the kernel rejects a
    # memory.memsw.limit_in_bytes below it. Setting both to the same value
    # leaves no room for swap.
    write_control(os.path.join(directory, "memory.limit_in_bytes"), str(limit))
    memsw = os.path.join(directory, "memory.memsw.limit_in_bytes")
    if os.path.exists(memsw):
        write_control(memsw, str(limit))
    else:
        # NOTE: without swap accounting (no memsw files) the group may still
        # swap; memory.swappiness 0 below only discourages it.
        _warn_swap_unlimited(memsw)
    try:
        write_control(os.path.join(directory, "memory.swappiness"), "0")
    except EngineError as exc:
        logger.debug("leaving memory.swappiness of %s unchanged: %s", directory, exc)
