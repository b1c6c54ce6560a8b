"""Cgroup interface, detection of the cgroup version, and helpers both drivers use.

A driver manages the sandbox cgroups of one engine instance. They live under
the engine root, a directory named ``root_name`` beneath the cgroup this
process runs in, in every hierarchy the driver uses. A sandbox group is
``<own cgroup>/<root_name>/<name>``. The driver creates the engine root on the
first ``create`` and never touches cgroups outside it.

``detect`` prefers cgroup v1 (``cgroupsv1``) when a v1 memory controller is
mounted, and otherwise uses the unified hierarchy (``cgroupsv2``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from engine.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EngineError,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)

logger = logging.getLogger(__name__)

# CFS bandwidth period used by both drivers, and the kernel's minimum quota.
CPU_PERIOD_US = 100_000
# Range and default of cgroup v2's cpu.weight, which CgroupLimits.cpu_weight uses.
MAX_CPU_WEIGHT = 10_000
DEFAULT_CPU_WEIGHT = 100
MIN_CPU_QUOTA_US = 1_000

# NAME_MAX of Linux file systems.
_NAME_MAX = 255
_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")

# Back-off between polls while tasks exit or rmdir returns EBUSY, in seconds.
_POLL_START = 0.005
_POLL_MAX = 0.1


@dataclass(frozen=True)
class CgroupLimits:
    """Resource limits of one sandbox group, where None means unlimited."""

    cpu: float | None = None  # cores, fractions allowed (0.5 = half a core)
    memory_bytes: int | None = None  # hard limit, swap disabled for the group
    pids: int | None = None  # max tasks
    # Share of CPU time under contention, relative to sibling groups, on the
    # scale of cgroup v2's cpu.weight: 1 to 10000, where 100 is the default.
    cpu_weight: int | None = None

    def __post_init__(self) -> None:
        if self.cpu is not None and not _is_positive_number(self.cpu):
            raise InvalidArgument(
                f"invalid cpu limit {self.cpu!r}: expected a positive finite "
                "number of cores such as 0.5, or None for no limit"
            )
        if self.memory_bytes is not None and not _is_positive_int(self.memory_bytes):
            raise InvalidArgument(
                f"invalid memory limit {self.memory_bytes!r}: expected a positive "
                "integer number of bytes, or None for no limit"
            )
        if self.pids is not None and not _is_positive_int(self.pids):
            raise InvalidArgument(
                f"invalid pids limit {self.pids!r}: expected a positive integer "
                "number of tasks, or None for no limit"
            )
        if self.cpu_weight is not None and not (
            _is_positive_int(self.cpu_weight) and self.cpu_weight <= MAX_CPU_WEIGHT
        ):
            raise InvalidArgument(
                f"invalid cpu weight {self.cpu_weight!r}: expected an integer from"
                f" 1 to {MAX_CPU_WEIGHT}, or None to leave it as it is"
            )


@dataclass(frozen=True)
class CgroupStats:
    """Usage of one sandbox group."""

    cpu_seconds: float
    memory_bytes: int  # current usage
    memory_peak_bytes: int  # peak usage
    pids: int  # current number of tasks


class Cgroup(ABC):
    """One sandbox group, which may span several v1 hierarchies."""

    name: str

    @abstractmethod
    def set_limits(self, limits: CgroupLimits) -> None:
        """Apply the limits that are not None; the others stay as they are."""

    @abstractmethod
    def procs_files(self) -> list[str]:
        """Return the absolute path of cgroup.procs in every hierarchy of the group.

        The engine opens these as root and hands the descriptors to a child,
        which joins the group by writing "0" into each.
        """

    @abstractmethod
    def stats(self) -> CgroupStats:
        """Read the group's CPU, memory and task usage."""

    @abstractmethod
    def oom_kills(self) -> int:
        """Return the number of OOM kills inside the group so far."""

    @abstractmethod
    def pids(self) -> list[int]:
        """Return the sorted host pids in the group and its descendants."""

    @abstractmethod
    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every task in the group until it is empty.

        Raises DeadlineExceeded if tasks remain after ``timeout`` seconds.
        """

    @abstractmethod
    def destroy(self, timeout: float = 5.0) -> None:
        """Kill the remaining tasks and remove the group from every hierarchy.

        Retries rmdir on EBUSY until ``timeout`` seconds have passed, then
        raises DeadlineExceeded. Directories that do not exist are skipped, so
        calling it again is harmless.
        """


class CgroupDriver(ABC):
    """Creator of the sandbox groups under one engine root."""

    version: int  # 1 or 2

    @property
    @abstractmethod
    def root_dirs(self) -> list[str]:
        """Directories of the engine root, one per hierarchy."""

    @abstractmethod
    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        """Create the group ``name`` under the engine root with ``limits``.

        Raises AlreadyExists if it exists. A failure after the first mkdir
        removes the directories this call made before raising.
        """

    @abstractmethod
    def open(self, name: str) -> Cgroup:
        """Return the existing group ``name``, or raise NotFound if it is absent."""

    @abstractmethod
    def list(self) -> list[str]:
        """Return the sorted names of the groups under the engine root."""

    @abstractmethod
    def remove_root(self) -> None:
        """Remove the engine root directories that contain no groups."""


def validate_name(name: str, label: str = "cgroup name") -> None:
    """Raise InvalidArgument unless ``name`` is one safe path component."""
    if (
        not isinstance(name, str)
        or len(name.encode()) > _NAME_MAX
        or not _NAME_PATTERN.fullmatch(name)
        or name.startswith(".")
        or ".." in name
    ):
        raise InvalidArgument(
            f"invalid {label} {name!r}: expected 1 to {_NAME_MAX} characters from "
            "A-Z a-z 0-9 . _ -, not starting with '.' and without '..'"
        )


def _is_positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def cpu_quota_us(cpu: float) -> int:
    """Convert a limit in cores to a CFS quota per CPU_PERIOD_US."""
    return max(MIN_CPU_QUOTA_US, round(cpu * CPU_PERIOD_US))


# --- Reading /proc/self/cgroup and /proc/self/mountinfo ---------------------


@dataclass(frozen=True)
class ProcCgroupEntry:
    """One line of /proc/<pid>/cgroup."""

    hierarchy_id: int
    controllers: tuple[str, ...]  # empty for the unified hierarchy
    path: str  # the process's cgroup inside that hierarchy


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup or cgroup2 line of /proc/<pid>/mountinfo."""

    fstype: str  # "cgroup" (v1) or "cgroup2"
    root: str  # directory of the hierarchy that is mounted
    mount_point: str
    super_options: tuple[str, ...]  # for v1, includes the controller names


def read_proc_cgroup(path: str) -> list[ProcCgroupEntry]:
    """Parse a /proc/<pid>/cgroup file."""
    entries = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split(":", 2)
            if len(fields) != 3 or not fields[0].isdigit():
                raise Unavailable(f"cannot parse line {line!r} of {path}")
            controllers = tuple(c for c in fields[1].split(",") if c)
            entries.append(ProcCgroupEntry(int(fields[0]), controllers, fields[2]))
    return entries


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash as \ooo octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def read_cgroup_mounts(path: str) -> list[CgroupMount]:
    """Parse the cgroup and cgroup2 mounts of a /proc/<pid>/mountinfo file."""
    mounts = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            fields = line.split()
            # Optional fields sit between field 6 and the "-" separator.
            if "-" not in fields[6:]:
                raise Unavailable(f"cannot parse line {line!r} of {path}")
            separator = fields.index("-", 6)
            if len(fields) < separator + 4:
                raise Unavailable(f"cannot parse line {line!r} of {path}")
            fstype = fields[separator + 1]
            if fstype not in ("cgroup", "cgroup2"):
                continue
            mounts.append(
                CgroupMount(
                    fstype=fstype,
                    root=_unescape_mountinfo(fields[3]),
                    mount_point=_unescape_mountinfo(fields[4]),
                    super_options=tuple(fields[separator + 3].split(",")),
                )
            )
    return mounts


def _directory_through(mount: CgroupMount, cgroup_path: str) -> str | None:
    """Return the directory of ``cgroup_path`` under ``mount``, or None if hidden."""
    root = mount.root.rstrip("/")  # "" when the whole hierarchy is mounted
    if root == "":
        relative = cgroup_path
    elif cgroup_path == root:
        relative = ""
    elif cgroup_path.startswith(root + "/"):
        relative = cgroup_path[len(root) :]
    else:
        return None
    directory = os.path.normpath(
        mount.mount_point.rstrip("/") + "/" + relative.lstrip("/")
    )
    return directory if os.path.isdir(directory) else None


def own_v1_dirs(
    entries: Sequence[ProcCgroupEntry], mounts: Sequence[CgroupMount]
) -> dict[str, str]:
    """Map each mounted v1 controller to the directory of this process's cgroup."""
    dirs: dict[str, str] = {}
    for entry in entries:
        if entry.hierarchy_id == 0 or not entry.controllers:
            continue
        for mount in mounts:
            if mount.fstype != "cgroup":
                continue
            if not set(entry.controllers) <= set(mount.super_options):
                continue
            directory = _directory_through(mount, entry.path)
            if directory is not None:
                for controller in entry.controllers:
                    dirs[controller] = directory
                break
    return dirs


def own_v2_dir(
    entries: Sequence[ProcCgroupEntry], mounts: Sequence[CgroupMount]
) -> str | None:
    """Return the directory of this process's cgroup in the unified hierarchy."""
    for entry in entries:
        if entry.hierarchy_id != 0 or entry.controllers:
            continue
        for mount in mounts:
            if mount.fstype != "cgroup2":
                continue
            directory = _directory_through(mount, entry.path)
            if directory is not None:
                return directory
    return None


def detect(
    root_name: str,
    *,
    proc_self_cgroup: str = "/proc/self/cgroup",
    mountinfo: str = "/proc/self/mountinfo",
) -> CgroupDriver:
    """Pick the cgroup driver for this machine and its engine root ``root_name``.

    Only reads files. The driver creates the engine root on its first create.
    """
    # Imported here because both driver modules import this one.
    from engine.runtime.cgroupsv1 import V1_CONTROLLERS, CgroupV1Driver
    from engine.runtime.cgroupsv2 import V2_CONTROLLERS, CgroupV2Driver

    validate_name(root_name, "engine root name")
    entries = read_proc_cgroup(proc_self_cgroup)
    mounts = read_cgroup_mounts(mountinfo)

    v1_dirs = own_v1_dirs(entries, mounts)
    if "memory" in v1_dirs:
        missing = [c for c in V1_CONTROLLERS if c not in v1_dirs]
        if missing:
            raise Unavailable(
                f"cgroup v1 memory controller is mounted but {', '.join(missing)} "
                f"is not: no cgroup mount in {mountinfo} lists it together with "
                f"this process's cgroup from {proc_self_cgroup}. Mount the "
                f"{', '.join(missing)} controller as cgroup v1."
            )
        root_dirs = {c: os.path.join(v1_dirs[c], root_name) for c in V1_CONTROLLERS}
        logger.debug("using cgroup v1 with engine root %s", root_dirs)
        return CgroupV1Driver(root_dirs)

    v2_dir = own_v2_dir(entries, mounts)
    if v2_dir is None:
        raise Unavailable(
            f"no usable cgroup hierarchy: {mountinfo} has neither a cgroup v1 "
            "memory controller nor a cgroup2 mount that contains this process's "
            f"cgroup from {proc_self_cgroup}. Mount cgroup2 (or the v1 memory, "
            "cpu, cpuacct and pids controllers)."
        )
    controllers_file = os.path.join(v2_dir, "cgroup.controllers")
    available = set(read_text(controllers_file).split())
    missing = [c for c in V2_CONTROLLERS if c not in available]
    if missing:
        raise Unavailable(
            f"cgroup2 is mounted but controller {', '.join(missing)} is not "
            f"available to this process's cgroup: {controllers_file} lists "
            f"{' '.join(sorted(available)) or 'nothing'}. Enable "
            f"{', '.join(missing)} in the cgroup.subtree_control of every "
            f"ancestor of {v2_dir}, for example with systemd's Delegate=yes."
        )
    root_dir = os.path.join(v2_dir, root_name)
    logger.debug("using cgroup v2 with engine root %s", root_dir)
    return CgroupV2Driver(root_dir)


# --- Control files -----------------------------------------------------------


def read_text(path: str) -> str:
    """Read a control file, or raise NotFound if it does not exist."""
    try:
        with open(path, encoding="ascii") as file:
            return file.read()
    except FileNotFoundError as exc:
        raise NotFound(
            f"{path} not found: the cgroup was removed or its controller is not enabled"
        ) from exc


def read_int(path: str) -> int:
    """Read a control file that contains one integer."""
    text = read_text(path)
    try:
        return int(text.strip())
    except ValueError as exc:
        raise InternalError(f"expected an integer in {path}, read {text!r}") from exc


def read_keyed(path: str, key: str) -> int:
    """Read the integer after ``key`` in a file of "key value" lines."""
    text = read_text(path)
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == key:
            try:
                return int(fields[1])
            except ValueError as exc:
                raise InternalError(
                    f"expected an integer after {key!r} in {path}, read {line!r}"
                ) from exc
    raise Unavailable(f"{path} has no {key!r} line, read {text!r}")


def write_control(path: str, value: str) -> None:
    """Write ``value`` to a control file in one write(2).

    The file must exist: a missing file means the controller is not enabled.
    """
    data = value.encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _write_error(path, value, exc) from exc
    if written != len(data):
        raise InternalError(
            f"short write to {path}: {written} of {len(data)} bytes of {value!r}"
        )


def _write_error(path: str, value: str, exc: OSError) -> Exception:
    code = exc.errno or 0
    reason = f"{errno.errorcode.get(code, code)}: {exc.strerror}"
    if code == errno.ENOENT:
        return Unavailable(
            f"writing {value!r} to {path} failed: the file does not exist, so the "
            "cgroup was removed or its controller is not enabled"
        )
    if code in (errno.EINVAL, errno.ERANGE, errno.EOVERFLOW):
        return InvalidArgument(
            f"the kernel rejected {value!r} for {path} ({reason}). Use a value "
            "inside the range the kernel accepts for that file."
        )
    if code in (errno.ENOSPC, errno.EAGAIN, errno.ENOMEM):
        return ResourceExhausted(f"writing {value!r} to {path} failed ({reason})")
    if code == errno.EBUSY:
        return FailedPrecondition(
            f"writing {value!r} to {path} failed ({reason}) because the group's "
            "current state does not allow it, for example usage above the new limit"
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(
            f"writing {value!r} to {path} failed ({reason}). Run the daemon as root."
        )
    return OSError(code, f"write({path!r}, {value!r}) failed: {exc.strerror}")


def make_cgroup_dir(path: str, mkdir: Callable[[str], None] = os.mkdir) -> None:
    """Create one cgroup directory, turning OSError into an engine error."""
    try:
        mkdir(path)
    except OSError as exc:
        code = exc.errno or 0
        reason = f"{errno.errorcode.get(code, code)}: {exc.strerror}"
        if code == errno.EEXIST:
            raise AlreadyExists(f"cgroup {path} already exists") from exc
        if code in (errno.ENOSPC, errno.EAGAIN, errno.ENOMEM):
            # cgroup.max.descendants and cgroup.max.depth fail with EAGAIN.
            raise ResourceExhausted(f"mkdir({path!r}) failed ({reason})") from exc
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionDenied(
                f"mkdir({path!r}) failed ({reason}). Run the daemon as root."
            ) from exc
        if code == errno.ENOENT:
            raise Unavailable(
                f"mkdir({path!r}) failed: its parent cgroup does not exist"
            ) from exc
        raise OSError(code, f"mkdir({path!r}) failed: {exc.strerror}") from exc


def ensure_dir(path: str, mkdir: Callable[[str], None] = os.mkdir) -> None:
    """Create a cgroup directory unless it exists."""
    with contextlib.suppress(AlreadyExists):
        make_cgroup_dir(path, mkdir)


# --- Tasks --------------------------------------------------------------------


def _subtree(top: str) -> list[str]:
    """Return ``top`` and its descendant directories, deepest first."""
    return [dirpath for dirpath, _, _ in os.walk(top, topdown=False)]


def list_pids(dirs: Iterable[str]) -> list[int]:
    """Return the sorted pids in cgroup.procs of ``dirs`` and their descendants."""
    pids: set[int] = set()
    for top in dirs:
        for directory in _subtree(top):
            try:
                with open(
                    os.path.join(directory, "cgroup.procs"), encoding="ascii"
                ) as f:
                    pids.update(int(line) for line in f if line.strip())
            except FileNotFoundError:
                continue  # removed while walking
    return sorted(pids)


def _signal_members(dirs: Sequence[str], pids: Iterable[int]) -> None:
    """SIGKILL those of ``pids`` that are still in ``dirs``.

    A pid read from cgroup.procs may exit and be reused by an unrelated
    process. A pidfd pins one process, and reading cgroup.procs again after
    opening it shows that this process was still in the group. If the pid is
    reused after the open, the pidfd still refers to the exited process, so
    the signal fails with ESRCH and never reaches the newcomer.
    """
    pidfds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
        members = set(list_pids(dirs))
        for pid, pidfd in pidfds.items():
            if pid not in members:
                continue
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                continue
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


def kill_tasks(name: str, dirs: Sequence[str], deadline: float) -> None:
    """SIGKILL the tasks in ``dirs`` until none is left or ``deadline`` passes.

    ``deadline`` is a time.monotonic() value. Raises DeadlineExceeded with the
    pids left at the deadline.
    """
    delay = _POLL_START
    while True:
        remaining = list_pids(dirs)
        if not remaining:
            return
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(
                f"killing the tasks of cgroup {name} timed out with pids "
                f"{remaining} still in it"
            )
        _signal_members(dirs, remaining)
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX)


def remove_group_dirs(
    name: str,
    dirs: Sequence[str],
    timeout: float,
    rmdir: Callable[[str], None] = os.rmdir,
) -> bool:
    """Kill the tasks in ``dirs`` and rmdir them with their descendants.

    Returns whether any directory existed. Missing directories are skipped,
    and rmdir is retried on EBUSY, killing late joiners, until ``timeout``.
    """
    # An empty group without descendants, the usual case once a sandbox's
    # PID 1 has exited, goes with one rmdir per hierarchy: no read of
    # cgroup.procs and no walk. rmdir fails with EBUSY while the group has
    # tasks or child groups, which the loop below then handles.
    removed = False
    busy = []
    for top in dirs:
        outcome = _try_rmdir(top, rmdir)
        removed |= outcome is True
        if outcome is None:
            busy.append(top)
    if not busy:
        return removed
    deadline = time.monotonic() + timeout
    kill_tasks(name, busy, deadline)
    for top in busy:
        for directory in _subtree(top):
            removed |= _rmdir_until(name, directory, deadline, rmdir)
    return removed


def _try_rmdir(directory: str, rmdir: Callable[[str], None]) -> bool | None:
    """Rmdir ``directory``: True if removed, False if missing, None on EBUSY.

    Any other failure raises OSError naming the directory.
    """
    try:
        rmdir(directory)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise OSError(
                exc.errno, f"rmdir({directory!r}) failed: {exc.strerror}"
            ) from exc
        return None
    return True


def _rmdir_until(
    name: str, directory: str, deadline: float, rmdir: Callable[[str], None]
) -> bool:
    delay = _POLL_START
    while True:
        outcome = _try_rmdir(directory, rmdir)
        if outcome is not None:
            return outcome
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(
                f"removing cgroup {name} timed out: rmdir({directory!r}) still "
                f"fails with EBUSY, and pids {list_pids([directory])} are in it"
            )
        _signal_members([directory], list_pids([directory]))
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX)


# --- Engine root ----------------------------------------------------------------


def list_groups(root_dirs: Iterable[str]) -> list[str]:
    """Return the sorted names of the group directories in any of ``root_dirs``."""
    names: set[str] = set()
    for root in root_dirs:
        try:
            with os.scandir(root) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        names.add(entry.name)
        except FileNotFoundError:
            continue
    return sorted(names)


def remove_roots(
    root_dirs: Iterable[str], rmdir: Callable[[str], None] = os.rmdir
) -> None:
    """Rmdir each of ``root_dirs`` that has no group in it."""
    for root in root_dirs:
        groups = list_groups([root])
        if groups:
            logger.info("kept engine root %s: it still contains %s", root, groups)
            continue
        outcome = _try_rmdir(root, rmdir)
        if outcome is None:
            logger.warning(
                "kept engine root %s: rmdir failed with EBUSY, pids in it: %s",
                root,
                list_pids([root]),
            )
        elif outcome:
            logger.info("removed engine root %s", root)


# Seconds since the last change of an abandoned engine root before another
# engine removes it; a starting engine's new, still empty groups are younger.
STALE_ROOT_SECONDS = 600.0


def remove_stale_roots(
    root_dirs: Iterable[str],
    prefix: str = "engine-",
    *,
    now: float | None = None,
    rmdir: Callable[[str], None] = os.rmdir,
) -> list[str]:
    """Remove the roots that killed engines left beside ours; return their paths.

    An engine that is killed keeps its root and its groups, and an engine on a
    temporary data dir never starts on that dir again to sweep them. A sibling
    of one of ``root_dirs`` whose name starts with ``prefix`` is removed when
    no process is in its tree and nothing in it changed for
    STALE_ROOT_SECONDS. Only directories below this process's own cgroup are
    looked at.
    """
    now = time.time() if now is None else now
    removed = []
    for root in root_dirs:
        parent, own = os.path.split(root)
        try:
            names = os.listdir(parent)
        except FileNotFoundError:
            continue
        for name in names:
            sibling = os.path.join(parent, name)
            if name == own or not name.startswith(prefix) or not os.path.isdir(sibling):
                continue
            tree = _subtree(sibling)
            if list_pids([sibling]):
                continue
            newest = max(os.stat(directory).st_mtime for directory in tree)
            if now - newest < STALE_ROOT_SECONDS:
                continue
            for directory in tree:
                with contextlib.suppress(OSError):
                    rmdir(directory)
            if not os.path.exists(sibling):
                logger.warning(
                    "removed engine root %s, left by a killed engine", sibling
                )
                removed.append(sibling)
    return removed


def undo_create(
    name: str, made: Sequence[str], rmdir: Callable[[str], None] = os.rmdir
) -> None:
    """Remove the directories a failed create made, logging any failure."""
    try:
        remove_group_dirs(name, list(reversed(made)), 5.0, rmdir)
    except (EngineError, OSError):
        logger.exception("removing half-created cgroup %s (%s) failed", name, made)
