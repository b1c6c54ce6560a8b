"""Host memory of a running engine: its processes' USS and its cgroups' kernel memory.

Nothing here assumes which processes the engine runs per sandbox. The
engine's processes are the daemon and every descendant of it (the zygote,
supervisors, each sandbox's PID 1 and processes, FUSE servers). Its cgroups
are the memory cgroups those processes run in, other than the daemon's own,
so a pre-made (pooled) sandbox counts as soon as it has a process.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from engine.runtime import cgroups

MIB = 1024 * 1024
# memory.stat keys of cgroup v2 whose sum is the kernel's memory, for kernels
# whose memory.stat has no "kernel" line. That line, the v2 analogue of v1's
# kmem counter, came with "memcg: add per-memcg total kernel memory stat"
# (commit a8c49af3be5f, Linux 5.18). The sum misses some accounted kernel
# allocations that the line counts.
V2_KERNEL_KEYS = ("kernel_stack", "pagetables", "percpu", "sock", "vmalloc", "slab")


@dataclass(frozen=True)
class Footprint:
    """One reading of the engine's memory on the host."""

    processes: int
    uss_bytes: int
    kmem_bytes: int
    # Memory cgroups that hold an engine process, the daemon's own excluded.
    cgroups: int
    # Open descriptors of the daemon and of its largest holder among the
    # descendants, which limit how many sandboxes one daemon can keep.
    daemon_fds: int
    max_descendant_fds: int

    @property
    def total_bytes(self) -> int:
        return self.uss_bytes + self.kmem_bytes


def _memory_cgroup(pid: int) -> str | None:
    """Return the memory cgroup path of ``pid`` as /proc/PID/cgroup names it."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    unified = None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
        if controllers == "":
            unified = path
    return unified


def _memory_mount() -> tuple[cgroups.CgroupMount, int]:
    """Return the mount of the memory controller and its cgroup version."""
    mounts = cgroups.read_cgroup_mounts("/proc/self/mountinfo")
    for mount in mounts:
        if mount.fstype == "cgroup" and "memory" in mount.super_options:
            return mount, 1
    for mount in mounts:
        if mount.fstype == "cgroup2":
            return mount, 2
    raise RuntimeError("no cgroup memory controller is mounted")


def _directory(mount: cgroups.CgroupMount, group: str) -> str:
    """Return the directory of cgroup ``group`` (a /proc/PID/cgroup path)."""
    root = mount.root.rstrip("/")
    if root and group.startswith(root + "/"):
        group = group[len(root) :]
    return os.path.join(mount.mount_point, group.lstrip("/"))


def kernel_memory(directory: str, version: int) -> int:
    """Return the kernel memory charged to the cgroup at ``directory``, in bytes.

    v1 reads memory.kmem.usage_in_bytes. v2 reads the "kernel" line of
    memory.stat, or the sum of V2_KERNEL_KEYS where that line is missing.
    Returns 0 for a cgroup removed meanwhile.
    """
    try:
        if version == 1:
            return int(Path(directory, "memory.kmem.usage_in_bytes").read_text())
        stat = {}
        for line in Path(directory, "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            stat[key] = int(value)
    except FileNotFoundError:
        return 0
    if "kernel" in stat:
        return stat["kernel"]
    return sum(stat.get(key, 0) for key in V2_KERNEL_KEYS)


def _fd_count(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return 0


def measure(daemon_pid: int) -> Footprint:
    """Read the USS of the daemon and its descendants, and their cgroups' kmem.

    Processes that exit during the reading are skipped.
    """
    daemon = psutil.Process(daemon_pid)
    processes = [daemon, *daemon.children(recursive=True)]
    mount, version = _memory_mount()
    own = _memory_cgroup(daemon_pid)
    uss = 0
    counted = 0
    groups: set[str] = set()
    max_fds = 0
    for process in processes:
        try:
            uss += process.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        counted += 1
        if process.pid != daemon_pid:
            max_fds = max(max_fds, _fd_count(process.pid))
        group = _memory_cgroup(process.pid)
        if group is not None and group != own:
            groups.add(group)
    # v1 and v2 memory counters are hierarchical, so a cgroup below another
    # counted one would be counted twice.
    top = {
        group
        for group in groups
        if not any(group.startswith(other + "/") for other in groups)
    }
    kmem = sum(kernel_memory(_directory(mount, group), version) for group in top)
    return Footprint(
        processes=counted,
        uss_bytes=uss,
        kmem_bytes=kmem,
        cgroups=len(top),
        daemon_fds=_fd_count(daemon_pid),
        max_descendant_fds=max_fds,
    )


def settle(
    daemon_pid: int, quiet_seconds: float = 2.0, timeout: float = 60.0
) -> Footprint:
    """Wait until the engine's process and cgroup counts stop changing.

    Returns the last reading once both counts held for ``quiet_seconds``, or
    at ``timeout`` seconds, so a pool refill in progress finishes first.
    """
    deadline = time.monotonic() + timeout
    last = measure(daemon_pid)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        reading = measure(daemon_pid)
        if (reading.processes, reading.cgroups) != (last.processes, last.cgroups):
            stable_since = time.monotonic()
        last = reading
        if time.monotonic() - stable_since >= quiet_seconds:
            break
    return last


def median_reading(daemon_pid: int, readings: int, interval: float) -> Footprint:
    """Take ``readings`` readings ``interval`` seconds apart; return the median one.

    The median is by total bytes, and the reading returned is a real one.
    """
    taken = []
    for index in range(readings):
        if index:
            time.sleep(interval)
        taken.append(measure(daemon_pid))
    taken.sort(key=lambda reading: reading.total_bytes)
    return taken[(len(taken) - 1) // 2]


def mem_available_bytes() -> int:
    """Return MemAvailable of /proc/meminfo in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def slope(points: list[tuple[float, float]]) -> float:
    """Return the least-squares slope of (x, y) points; needs two distinct x."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mean_x = statistics.fmean(xs)
    mean_y = statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        raise ValueError("a slope needs points at two or more distinct x values")
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
