"""Cgroup drivers against the real kernel.

The v1 tests need root and a cgroup v1 memory controller, which this machine
has. Every test uses its own engine root and removes it on teardown.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import AlreadyExists, InvalidArgument, NotFound
from engine.runtime import cgroups
from engine.runtime.cgroups import Cgroup, CgroupDriver, CgroupLimits
from engine.runtime.cgroupsv1 import CgroupV1, CgroupV1Driver
from engine.runtime.cgroupsv2 import CgroupV2Driver

MIB = 1 << 20


def _unique_root_name() -> str:
    return f"engine-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _cleanup(driver: CgroupDriver) -> None:
    for name in driver.list():
        driver.open(name).destroy()
    driver.remove_root()
    for root in driver.root_dirs:
        assert not os.path.exists(root), f"engine root {root} left behind"


@pytest.fixture
def driver() -> Iterator[CgroupDriver]:
    cgroup_driver = cgroups.detect(_unique_root_name())
    try:
        yield cgroup_driver
    finally:
        _cleanup(cgroup_driver)


@pytest.fixture
def v1(driver: CgroupDriver) -> CgroupV1Driver:
    assert isinstance(driver, CgroupV1Driver), (
        f"expected the v1 driver on this cgroup v1 machine, got {driver!r}"
    )
    return driver


def _join(group: Cgroup, pid: int) -> None:
    for procs in group.procs_files():
        with open(procs, "w") as file:
            file.write(str(pid))


def _start_gated_python(code: str) -> subprocess.Popen[str]:
    """Start a Python child that runs ``code`` after reading one line from stdin."""
    script = "import sys\nsys.stdin.readline()\n" + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _release(child: subprocess.Popen[str], timeout: float = 30) -> str:
    stdout, _ = child.communicate("go\n", timeout=timeout)
    return stdout


def _reap(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()


def _read(directory: str, filename: str) -> str:
    with open(os.path.join(directory, filename)) as file:
        return file.read().strip()


def _own_cgroup_path(controller: str) -> str:
    with open("/proc/self/cgroup") as file:
        for line in file:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return path
    raise AssertionError(f"no {controller} line in /proc/self/cgroup")


def test_detect_picks_v1(driver: CgroupDriver) -> None:
    assert driver.version == 1
    assert isinstance(driver, CgroupV1Driver)


def test_detect_rejects_invalid_root_name() -> None:
    with pytest.raises(InvalidArgument):
        cgroups.detect("../engine")


def test_v1_groups_under_own_cgroup(v1: CgroupV1Driver) -> None:
    group = v1.create("placed", CgroupLimits())
    assert isinstance(group, CgroupV1)
    root_name = os.path.basename(v1.root_dirs[0])
    for controller, directory in group.dirs.items():
        own = _own_cgroup_path(controller).rstrip("/")
        suffix = f"{own}/{root_name}/placed"
        assert directory.endswith(suffix), (controller, directory, suffix)
        assert os.path.isdir(directory), directory


def test_v1_create_writes_limits(v1: CgroupV1Driver) -> None:
    limits = CgroupLimits(cpu=0.5, memory_bytes=64 * MIB, pids=7)
    group = v1.create("limited", limits)
    assert isinstance(group, CgroupV1)
    memory = group.dirs["memory"]
    assert _read(memory, "memory.limit_in_bytes") == str(64 * MIB)
    assert _read(memory, "memory.memsw.limit_in_bytes") == str(64 * MIB)
    assert _read(memory, "memory.swappiness") == "0"
    assert _read(group.dirs["cpu"], "cpu.cfs_period_us") == "100000"
    assert _read(group.dirs["cpu"], "cpu.cfs_quota_us") == "50000"
    assert _read(group.dirs["pids"], "pids.max") == "7"


@pytest.mark.parametrize(
    ("weight", "shares"), [(1, "10"), (100, "1024"), (250, "2560")]
)
def test_v1_cpu_weight_sets_shares(
    v1: CgroupV1Driver, weight: int, shares: str
) -> None:
    group = v1.create(f"weighted-{weight}", CgroupLimits(cpu_weight=weight))
    assert isinstance(group, CgroupV1)
    assert _read(group.dirs["cpu"], "cpu.shares") == shares


def test_v1_weight_changes_later(v1: CgroupV1Driver) -> None:
    group = v1.create("pooled", CgroupLimits(cpu_weight=1))
    assert isinstance(group, CgroupV1)
    group.set_limits(CgroupLimits(cpu=1.0, cpu_weight=100))
    assert _read(group.dirs["cpu"], "cpu.shares") == "1024"
    assert _read(group.dirs["cpu"], "cpu.cfs_quota_us") == "100000"


def test_v1_small_cpu_gets_min_quota(v1: CgroupV1Driver) -> None:
    group = v1.create("tiny", CgroupLimits(cpu=0.001))
    assert isinstance(group, CgroupV1)
    assert _read(group.dirs["cpu"], "cpu.cfs_quota_us") == "1000"


def test_v1_no_limits_leaves_defaults(v1: CgroupV1Driver) -> None:
    group = v1.create("unlimited", CgroupLimits())
    assert isinstance(group, CgroupV1)
    assert _read(group.dirs["cpu"], "cpu.cfs_quota_us") == "-1"
    assert _read(group.dirs["pids"], "pids.max") == "max"
    assert int(_read(group.dirs["memory"], "memory.limit_in_bytes")) > 1 << 60


def test_v1_procs_files_per_hierarchy(v1: CgroupV1Driver) -> None:
    group = v1.create("procs", CgroupLimits())
    files = group.procs_files()
    # On this machine memory, cpu, cpuacct and pids are four separate mounts.
    assert len(files) == 4
    assert len(set(files)) == 4
    for path in files:
        assert os.path.basename(path) == "cgroup.procs"
        assert os.path.isfile(path), path


def test_v1_pids_and_stats_of_child(v1: CgroupV1Driver) -> None:
    group = v1.create("sleeper", CgroupLimits(memory_bytes=64 * MIB))
    child = subprocess.Popen(["/bin/sleep", "60"])
    try:
        _join(group, child.pid)
        assert group.pids() == [child.pid]
        stats = group.stats()
        assert stats.pids == 1
        assert stats.memory_bytes >= 0
        assert stats.memory_peak_bytes >= stats.memory_bytes
        assert stats.cpu_seconds >= 0
        assert group.oom_kills() == 0
    finally:
        _reap(child)


def test_v1_memory_limit_oom_kills(v1: CgroupV1Driver) -> None:
    limit = 32 * MIB
    group = v1.create("hog", CgroupLimits(memory_bytes=limit))
    # bytes multiplication writes every page, so all 128 MiB are charged.
    child = _start_gated_python("data = b'x' * (128 << 20)\nprint('survived')\n")
    try:
        _join(group, child.pid)
        assert group.oom_kills() == 0
        stdout = _release(child)
        assert child.returncode == -9, stdout
        assert "survived" not in stdout
        assert group.oom_kills() == 1
        assert group.stats().memory_peak_bytes <= limit
    finally:
        _reap(child)


def test_v1_cpu_quota_throttles(v1: CgroupV1Driver) -> None:
    group = v1.create("spinner", CgroupLimits(cpu=0.2))
    child = _start_gated_python(
        """
        import time
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            pass
        """
    )
    try:
        _join(group, child.pid)
        _release(child)
        assert child.returncode == 0
        cpu_seconds = group.stats().cpu_seconds
        # An unthrottled spin would use about 1.0 s in 1 s of wall time.
        assert cpu_seconds < 0.5
        assert cpu_seconds > 0.05
    finally:
        _reap(child)


def test_v1_pids_limit_blocks_fork(v1: CgroupV1Driver) -> None:
    group = v1.create("forker", CgroupLimits(pids=5))
    child = _start_gated_python(
        """
        import os, signal, time
        children = []
        result = "no error after 50 forks"
        for _ in range(50):
            try:
                pid = os.fork()
            except BlockingIOError:
                result = f"EAGAIN after {len(children)} forks"
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        print(result)
        """
    )
    try:
        _join(group, child.pid)
        stdout = _release(child)
        assert child.returncode == 0
        # The child itself is one of the five tasks.
        assert stdout.strip() == "EAGAIN after 4 forks"
    finally:
        _reap(child)


def test_v1_kill_all_empties_group(v1: CgroupV1Driver) -> None:
    group = v1.create("family", CgroupLimits())
    child = _start_gated_python(
        r"""
        import os, time
        for _ in range(3):
            if os.fork() == 0:
                break
        os.write(1, f"{os.getpid()}\n".encode())
        time.sleep(60)
        """
    )
    try:
        _join(group, child.pid)
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        # The parent and three forked children each print their pid.
        printed = {int(child.stdout.readline()) for _ in range(4)}
        assert set(group.pids()) == printed
        group.kill_all()
        assert group.pids() == []
        assert child.wait(timeout=10) == -9
    finally:
        _reap(child)


def test_v1_destroy_removes_dirs(v1: CgroupV1Driver) -> None:
    group = v1.create("doomed", CgroupLimits(cpu=1, memory_bytes=64 * MIB, pids=10))
    assert isinstance(group, CgroupV1)
    child = subprocess.Popen(["/bin/sleep", "60"])
    try:
        _join(group, child.pid)
        group.destroy()
        assert child.wait(timeout=10) == -9
        for directory in group.directories:
            assert not os.path.exists(directory), directory
        assert v1.list() == []
    finally:
        _reap(child)


def test_v1_destroy_twice_is_harmless(v1: CgroupV1Driver) -> None:
    group = v1.create("again", CgroupLimits())
    group.destroy()
    group.destroy()
    with pytest.raises(NotFound):
        v1.open("again")


def test_v1_destroy_removes_subgroups(v1: CgroupV1Driver) -> None:
    group = v1.create("nested", CgroupLimits())
    assert isinstance(group, CgroupV1)
    inner = os.path.join(group.dirs["pids"], "inner")
    os.mkdir(inner)
    child = subprocess.Popen(["/bin/sleep", "60"])
    try:
        with open(os.path.join(inner, "cgroup.procs"), "w") as file:
            file.write(str(child.pid))
        assert group.pids() == [child.pid]
        group.destroy()
        assert child.wait(timeout=10) == -9
        assert not os.path.exists(inner)
        assert not os.path.exists(group.dirs["pids"])
    finally:
        _reap(child)


def test_v1_rejected_limit_rolls_back(v1: CgroupV1Driver) -> None:
    # 1e9 cores is a quota far above the kernel's maximum, so the write fails
    # after every directory was made.
    with pytest.raises(InvalidArgument, match=r"cpu\.cfs_quota_us"):
        v1.create("toobig", CgroupLimits(cpu=1e9))
    assert v1.list() == []
    for root in v1.root_dirs:
        assert not os.path.exists(os.path.join(root, "toobig")), root


def test_create_existing_raises(driver: CgroupDriver) -> None:
    driver.create("twice", CgroupLimits())
    with pytest.raises(AlreadyExists):
        driver.create("twice", CgroupLimits())
    assert driver.list() == ["twice"]


def test_open_missing_raises(driver: CgroupDriver) -> None:
    with pytest.raises(NotFound):
        driver.open("absent")


def test_open_returns_same_dirs(driver: CgroupDriver) -> None:
    created = driver.create("reopened", CgroupLimits())
    opened = driver.open("reopened")
    assert opened.name == "reopened"
    assert opened.procs_files() == created.procs_files()


def test_list_returns_created_names(driver: CgroupDriver) -> None:
    assert driver.list() == []
    for name in ("beta", "alpha", "gamma-1.2_x"):
        driver.create(name, CgroupLimits())
    assert driver.list() == ["alpha", "beta", "gamma-1.2_x"]


def test_remove_root_keeps_nonempty(driver: CgroupDriver) -> None:
    group = driver.create("keeper", CgroupLimits())
    driver.remove_root()
    for root in driver.root_dirs:
        assert os.path.isdir(root), root
    group.destroy()
    driver.remove_root()
    for root in driver.root_dirs:
        assert not os.path.exists(root), root


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "a/b",
        "../x",
        "a..b",
        ".hidden",
        "a b",
        "x" * 256,
        "caf\u00e9",
        "a\n",
    ],
)
def test_invalid_names_rejected(driver: CgroupDriver, name: str) -> None:
    with pytest.raises(InvalidArgument):
        driver.create(name, CgroupLimits())
    with pytest.raises(InvalidArgument):
        driver.open(name)
    assert driver.list() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpu": 0},
        {"cpu": -1.0},
        {"cpu": float("nan")},
        {"cpu": float("inf")},
        {"cpu": True},
        {"memory_bytes": 0},
        {"memory_bytes": 1.5},
        {"memory_bytes": True},
        {"pids": 0},
        {"pids": -3},
        {"pids": "5"},
        {"cpu_weight": 0},
        {"cpu_weight": 10_001},
        {"cpu_weight": 1.5},
    ],
)
def test_invalid_limits_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        CgroupLimits(**kwargs)  # type: ignore[arg-type]


def _unified_cgroup_dir() -> str | None:
    entries = cgroups.read_proc_cgroup("/proc/self/cgroup")
    mounts = cgroups.read_cgroup_mounts("/proc/self/mountinfo")
    return cgroups.own_v2_dir(entries, mounts)


def _unified_has_memory() -> bool:
    directory = _unified_cgroup_dir()
    if directory is None:
        return False
    with open(os.path.join(directory, "cgroup.controllers")) as file:
        return "memory" in file.read().split()


@pytest.mark.skipif(
    not _unified_has_memory(),
    reason="the unified cgroup hierarchy here has no memory controller, because "
    "this machine gives memory to cgroup v1",
)
def test_v2_driver_real() -> None:
    own = _unified_cgroup_dir()
    assert own is not None
    driver = CgroupV2Driver(os.path.join(own, _unique_root_name()))
    try:
        group = driver.create(
            "real", CgroupLimits(cpu=0.5, memory_bytes=64 * MIB, pids=7)
        )
        directory = os.path.dirname(group.procs_files()[0])
        assert _read(directory, "cpu.max") == "50000 100000"
        assert _read(directory, "memory.max") == str(64 * MIB)
        assert _read(directory, "pids.max") == "7"
        child = subprocess.Popen(["/bin/sleep", "60"])
        try:
            _join(group, child.pid)
            assert group.pids() == [child.pid]
            assert group.stats().pids == 1
            group.destroy()
            assert child.wait(timeout=10) == -9
            assert not os.path.exists(directory)
        finally:
            _reap(child)
    finally:
        _cleanup(driver)


def test_stale_roots_removed(tmp_path: Path) -> None:
    parent = tmp_path / "process"
    own = parent / "engine-own"
    old = parent / "engine-old"
    busy = parent / "engine-busy"
    young = parent / "engine-young"
    other = parent / "not-an-engine"
    for directory in (own, old / "pool-1", busy / "pool-2", young, other):
        directory.mkdir(parents=True)
    (busy / "pool-2" / "cgroup.procs").write_text("1\n")
    long_ago = time.time() - cgroups.STALE_ROOT_SECONDS - 60
    for directory in (old, old / "pool-1", busy, busy / "pool-2", other):
        os.utime(directory, (long_ago, long_ago))
    removed = cgroups.remove_stale_roots([str(own)])
    assert removed == [str(old)]
    assert not old.exists()
    assert busy.exists()
    assert young.exists()
    assert other.exists()
    assert own.exists()


def test_remove_group_dirs_empty_group_skips_the_walk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A plain directory takes the place of an empty cgroup, which rmdir removes
    # at once.
    group = tmp_path / "group"
    group.mkdir()

    def no_listing(_: object) -> list[int]:
        raise AssertionError("an empty group needs no read of cgroup.procs")

    monkeypatch.setattr(cgroups, "list_pids", no_listing)
    assert cgroups.remove_group_dirs("group", [str(group)], timeout=1.0)
    assert not group.exists()


def test_remove_group_dirs_busy_group_takes_the_walk(tmp_path: Path) -> None:
    # An rmdir that raises EBUSY once takes the place of a cgroup that still
    # has tasks, so the walk, with its reads of cgroup.procs, runs.
    group = tmp_path / "group"
    group.mkdir()
    calls: list[str] = []

    def busy_once(path: str) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EBUSY, "Device or resource busy")
        os.rmdir(path)

    assert cgroups.remove_group_dirs("group", [str(group)], 1.0, busy_once)
    assert calls == [str(group), str(group)]
    assert not group.exists()
