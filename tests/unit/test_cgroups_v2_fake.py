"""Cgroup detection and the v2 driver on a plain directory tree in tmp_path.

The tree imitates cgroupfs with regular files, and fake /proc/self/cgroup and
/proc/self/mountinfo files point at it. On cgroupfs the kernel creates the
control files on mkdir and deletes them on rmdir, so the tests hand the v2
driver a mkdir and an rmdir that do that. No test here touches a real cgroup.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from engine.runtime import cgroups
from engine.runtime.cgroups import CgroupLimits
from engine.runtime.cgroupsv1 import CgroupV1Driver
from engine.runtime.cgroupsv2 import CgroupV2, CgroupV2Driver

MIB = 1 << 20

# Default control files of each controller, as cgroupfs creates them.
CONTROLLER_FILES = {
    "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"},
    "memory": {
        "memory.max": "max\n",
        "memory.swap.max": "max\n",
        "memory.current": "0\n",
        "memory.peak": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    },
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
}
CORE_FILES = {
    "cgroup.procs": "",
    "cgroup.kill": "",
    "cgroup.subtree_control": "",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
}


def _fake_mkdir(path: str, controller_files: dict[str, dict[str, str]]) -> None:
    """Create a directory with the files cgroupfs would create in it."""
    os.mkdir(path)
    parent = os.path.dirname(path)
    with open(os.path.join(parent, "cgroup.subtree_control")) as file:
        enabled = [token.lstrip("+") for token in file.read().split()]
    files = dict(CORE_FILES)
    files["cgroup.controllers"] = " ".join(enabled) + "\n"
    for controller in enabled:
        files.update(controller_files.get(controller, {}))
    for filename, content in files.items():
        Path(path, filename).write_text(content)


def fake_rmdir(path: str) -> None:
    """Remove a directory like cgroupfs does: EBUSY while it has subgroups."""
    if not os.path.isdir(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
    for entry in os.scandir(path):
        os.unlink(entry.path)
    os.rmdir(path)


@dataclass
class FakeSystem:
    """Paths of a fake cgroup2 tree and of the /proc files that describe it."""

    mount: Path  # mount point of the fake cgroup2
    own: Path  # this process's fake cgroup
    proc_self_cgroup: Path
    mountinfo: Path
    # Files that mkdir creates for each controller enabled in the parent.
    controller_files: dict[str, dict[str, str]] = field(
        default_factory=lambda: {c: dict(f) for c, f in CONTROLLER_FILES.items()}
    )

    def mkdir(self, path: str) -> None:
        _fake_mkdir(path, self.controller_files)

    def detect(self, root_name: str = "engine-fake") -> cgroups.CgroupDriver:
        return cgroups.detect(
            root_name,
            proc_self_cgroup=str(self.proc_self_cgroup),
            mountinfo=str(self.mountinfo),
        )

    def driver(self, root_name: str = "engine-fake") -> CgroupV2Driver:
        return CgroupV2Driver(
            str(self.own / root_name), mkdir=self.mkdir, rmdir=fake_rmdir
        )


def _write_cgroup(directory: Path, controllers: str, subtree_control: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cgroup.controllers").write_text(controllers + "\n")
    (directory / "cgroup.subtree_control").write_text(subtree_control + "\n")
    (directory / "cgroup.procs").write_text("")


MOUNTINFO_HEADER = (
    "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "31 22 0:28 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755\n"
)


@pytest.fixture
def fake(tmp_path: Path) -> FakeSystem:
    mount = tmp_path / "cgroup2"
    _write_cgroup(mount, "cpuset cpu io memory hugetlb pids", "cpu memory pids")
    own = mount / "daemon.scope"
    _write_cgroup(own, "cpu memory pids", "cpu memory pids")

    proc_self_cgroup = tmp_path / "proc_self_cgroup"
    proc_self_cgroup.write_text("0::/daemon.scope\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        MOUNTINFO_HEADER
        + f"41 31 0:38 / {mount} rw,nosuid,nodev shared:12 - cgroup2 cgroup2 rw\n"
    )
    return FakeSystem(mount, own, proc_self_cgroup, mountinfo)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process this test owns, so that listing its pid in a fake file is safe."""
    child = subprocess.Popen(["/bin/sleep", "60"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def _group_dir(group: cgroups.Cgroup) -> Path:
    assert isinstance(group, CgroupV2)
    return Path(group.directory)


# --- detect() -------------------------------------------------------------------


def test_detect_picks_v2(fake: FakeSystem) -> None:
    driver = fake.detect("engine-abc")
    assert driver.version == 2
    assert isinstance(driver, CgroupV2Driver)
    assert driver.root_dirs == [str(fake.own / "engine-abc")]


def test_detect_creates_nothing(fake: FakeSystem) -> None:
    fake.detect("engine-abc")
    assert not (fake.own / "engine-abc").exists()


def test_detect_v2_root_cgroup(fake: FakeSystem) -> None:
    fake.proc_self_cgroup.write_text("0::/\n")
    driver = fake.detect("engine-abc")
    assert driver.root_dirs == [str(fake.mount / "engine-abc")]


def test_detect_v2_missing_controller(fake: FakeSystem) -> None:
    (fake.own / "cgroup.controllers").write_text("cpu memory\n")
    with pytest.raises(Unavailable, match="pids") as raised:
        fake.detect()
    assert str(fake.own / "cgroup.controllers") in str(raised.value)


def test_detect_no_cgroup_mount(fake: FakeSystem) -> None:
    fake.mountinfo.write_text(MOUNTINFO_HEADER)
    with pytest.raises(Unavailable, match="no usable cgroup hierarchy"):
        fake.detect()


def test_detect_cgroup_outside_mount(fake: FakeSystem) -> None:
    fake.proc_self_cgroup.write_text("0::/elsewhere.scope\n")
    with pytest.raises(Unavailable, match="no usable cgroup hierarchy"):
        fake.detect()


def test_detect_rejects_invalid_root_name(fake: FakeSystem) -> None:
    with pytest.raises(InvalidArgument):
        fake.detect("engine/../x")


def _fake_v1(tmp_path: Path, fake: FakeSystem, *, with_pids: bool = True) -> None:
    """Add v1 mounts: memory mounted from /outer, cpu and cpuacct co-mounted."""
    memory = tmp_path / "v1" / "memory"
    cpu = tmp_path / "v1" / "cpu,cpuacct"
    pids = tmp_path / "v1" / "pids"
    (memory / "box" / "hex").mkdir(parents=True)
    cpu.mkdir(parents=True)
    pids.mkdir(parents=True)
    lines = [
        f"32 31 0:29 / {cpu} rw,relatime - cgroup cgroup rw,cpu,cpuacct",
        # This mount shows the hierarchy from /outer, so the process's
        # /outer/box/hex cgroup is at <mount>/box/hex.
        f"35 31 0:32 /outer {memory} rw,relatime - cgroup cgroup rw,memory",
        f"40 31 0:37 / {tmp_path} rw,relatime - cgroup cgroup rw,xattr,name=systemd",
    ]
    if with_pids:
        lines.append(f"39 31 0:36 / {pids} rw,relatime - cgroup cgroup rw,pids")
    lines.append(f"41 31 0:38 / {fake.mount} rw,relatime - cgroup2 cgroup2 rw")
    fake.mountinfo.write_text(MOUNTINFO_HEADER + "\n".join(lines) + "\n")
    fake.proc_self_cgroup.write_text(
        "9:name=systemd:/\n"
        "8:pids:/\n"
        "4:memory:/outer/box/hex\n"
        "2:cpu,cpuacct:/\n"
        "0::/daemon.scope\n"
    )


def test_detect_prefers_v1_memory(tmp_path: Path, fake: FakeSystem) -> None:
    _fake_v1(tmp_path, fake)
    driver = fake.detect("engine-abc")
    assert driver.version == 1
    assert isinstance(driver, CgroupV1Driver)
    memory_root = str(tmp_path / "v1" / "memory" / "box" / "hex" / "engine-abc")
    cpu_root = str(tmp_path / "v1" / "cpu,cpuacct" / "engine-abc")
    pids_root = str(tmp_path / "v1" / "pids" / "engine-abc")
    # cpu and cpuacct share one hierarchy, so it appears once.
    assert driver.root_dirs == [memory_root, cpu_root, pids_root]


def test_detect_v1_missing_pids(tmp_path: Path, fake: FakeSystem) -> None:
    _fake_v1(tmp_path, fake, with_pids=False)
    with pytest.raises(Unavailable, match="pids"):
        fake.detect()


def test_mountinfo_escaped_mount_point(tmp_path: Path) -> None:
    mount = tmp_path / "with space"
    mount.mkdir()
    mountinfo = tmp_path / "mountinfo"
    escaped = str(mount).replace(" ", "\\040")
    mountinfo.write_text(
        f"41 31 0:38 / {escaped} rw shared:12 master:3 - cgroup2 cgroup2 rw\n"
    )
    mounts = cgroups.read_cgroup_mounts(str(mountinfo))
    assert len(mounts) == 1
    assert mounts[0].mount_point == str(mount)
    assert mounts[0].fstype == "cgroup2"


def test_proc_cgroup_parsing(tmp_path: Path) -> None:
    path = tmp_path / "cgroup"
    path.write_text("4:memory:/a:b/c\n2:cpu,cpuacct:/\n0::/user.slice\n")
    entries = cgroups.read_proc_cgroup(str(path))
    assert entries[0] == cgroups.ProcCgroupEntry(4, ("memory",), "/a:b/c")
    assert entries[1] == cgroups.ProcCgroupEntry(2, ("cpu", "cpuacct"), "/")
    assert entries[2] == cgroups.ProcCgroupEntry(0, (), "/user.slice")


# --- create() and limits ---------------------------------------------------------


def test_create_writes_limit_files(fake: FakeSystem) -> None:
    driver = fake.driver()
    limits = CgroupLimits(cpu=0.5, memory_bytes=64 * MIB, pids=7)
    directory = _group_dir(driver.create("box", limits))
    assert directory == fake.own / "engine-fake" / "box"
    assert (directory / "cpu.max").read_text() == "50000 100000"
    assert (directory / "memory.max").read_text() == str(64 * MIB)
    assert (directory / "memory.swap.max").read_text() == "0"
    assert (directory / "pids.max").read_text() == "7"


def test_create_enables_root_controllers(fake: FakeSystem) -> None:
    driver = fake.driver()
    driver.create("box", CgroupLimits())
    root_control = fake.own / "engine-fake" / "cgroup.subtree_control"
    assert root_control.read_text() == "+cpu +memory +pids"
    assert (fake.own / "cgroup.subtree_control").read_text() == "cpu memory pids\n"


def test_create_skips_enabled_root(fake: FakeSystem) -> None:
    driver = fake.driver()
    driver.create("first", CgroupLimits())
    root_control = fake.own / "engine-fake" / "cgroup.subtree_control"
    root_control.write_text("cpu memory pids\n")
    driver.create("second", CgroupLimits())
    assert root_control.read_text() == "cpu memory pids\n"


def test_create_writes_cpu_weight(fake: FakeSystem) -> None:
    directory = _group_dir(fake.driver().create("low", CgroupLimits(cpu_weight=1)))
    assert (directory / "cpu.weight").read_text() == "1"


def test_create_min_cpu_quota(fake: FakeSystem) -> None:
    directory = _group_dir(fake.driver().create("tiny", CgroupLimits(cpu=0.001)))
    assert (directory / "cpu.max").read_text() == "1000 100000"


def test_create_more_than_one_core(fake: FakeSystem) -> None:
    directory = _group_dir(fake.driver().create("wide", CgroupLimits(cpu=2.5)))
    assert (directory / "cpu.max").read_text() == "250000 100000"


def test_create_no_limits_writes_nothing(fake: FakeSystem) -> None:
    directory = _group_dir(fake.driver().create("free", CgroupLimits()))
    assert (directory / "cpu.max").read_text() == "max 100000\n"
    assert (directory / "memory.max").read_text() == "max\n"
    assert (directory / "memory.swap.max").read_text() == "max\n"
    assert (directory / "pids.max").read_text() == "max\n"


def test_create_without_swap_file(fake: FakeSystem) -> None:
    del fake.controller_files["memory"]["memory.swap.max"]
    directory = _group_dir(
        fake.driver().create("noswap", CgroupLimits(memory_bytes=MIB))
    )
    assert (directory / "memory.max").read_text() == str(MIB)
    assert not (directory / "memory.swap.max").exists()


def test_create_existing_raises(fake: FakeSystem) -> None:
    driver = fake.driver()
    driver.create("box", CgroupLimits())
    with pytest.raises(AlreadyExists):
        driver.create("box", CgroupLimits())


def test_create_failure_removes_group(fake: FakeSystem) -> None:
    # Without pids.max the last limit write fails, after cpu.max was written.
    del fake.controller_files["pids"]["pids.max"]
    driver = fake.driver()
    with pytest.raises(Unavailable, match=r"pids\.max"):
        driver.create("broken", CgroupLimits(cpu=1, pids=5))
    assert not (fake.own / "engine-fake" / "broken").exists()
    assert driver.list() == []


@pytest.mark.parametrize("name", ["", "..", "a/b", ".x", "a..b", "sp ace"])
def test_invalid_names_rejected(fake: FakeSystem, name: str) -> None:
    driver = fake.driver()
    with pytest.raises(InvalidArgument):
        driver.create(name, CgroupLimits())
    with pytest.raises(InvalidArgument):
        driver.open(name)


# --- Delegation -------------------------------------------------------------------


def test_parent_not_delegating_memory(fake: FakeSystem) -> None:
    parent_control = fake.own / "cgroup.subtree_control"
    parent_control.write_text("cpu pids\n")
    driver = fake.driver()
    with pytest.raises(Unavailable) as raised:
        driver.create("box", CgroupLimits())
    message = str(raised.value)
    assert "'memory'" in message
    assert str(parent_control) in message
    assert "Delegate=yes" in message
    assert parent_control.read_text() == "cpu pids\n"
    assert not (fake.own / "engine-fake").exists()


# --- Reading a group -------------------------------------------------------------


def test_stats_parsing(fake: FakeSystem) -> None:
    group = fake.driver().create("box", CgroupLimits())
    directory = _group_dir(group)
    (directory / "cpu.stat").write_text(
        "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
    )
    (directory / "memory.current").write_text("1048576\n")
    (directory / "memory.peak").write_text("4194304\n")
    (directory / "pids.current").write_text("3\n")
    stats = group.stats()
    assert stats.cpu_seconds == 2.5
    assert stats.memory_bytes == 1048576
    assert stats.memory_peak_bytes == 4194304
    assert stats.pids == 3


def test_stats_peak_falls_back(fake: FakeSystem) -> None:
    group = fake.driver().create("box", CgroupLimits())
    directory = _group_dir(group)
    (directory / "memory.current").write_text("8192\n")
    (directory / "memory.peak").unlink()
    assert group.stats().memory_peak_bytes == 8192


def test_oom_kills_parsing(fake: FakeSystem) -> None:
    group = fake.driver().create("box", CgroupLimits())
    assert group.oom_kills() == 0
    (_group_dir(group) / "memory.events").write_text(
        "low 0\nhigh 0\nmax 12\noom 4\noom_kill 3\noom_group_kill 0\n"
    )
    assert group.oom_kills() == 3


def test_pids_reads_procs(fake: FakeSystem, sleeper: subprocess.Popen[bytes]) -> None:
    group = fake.driver().create("box", CgroupLimits())
    procs = _group_dir(group) / "cgroup.procs"
    procs.write_text(f"{sleeper.pid}\n")
    try:
        assert group.pids() == [sleeper.pid]
        assert group.procs_files() == [str(procs)]
    finally:
        procs.write_text("")


def test_open_existing_and_missing(fake: FakeSystem) -> None:
    driver = fake.driver()
    driver.create("box", CgroupLimits())
    assert driver.open("box").procs_files() == [
        str(fake.own / "engine-fake" / "box" / "cgroup.procs")
    ]
    with pytest.raises(NotFound):
        driver.open("absent")


# --- Killing and removal -----------------------------------------------------------


def test_kill_all_writes_cgroup_kill(fake: FakeSystem) -> None:
    group = fake.driver().create("box", CgroupLimits())
    group.kill_all()
    assert (_group_dir(group) / "cgroup.kill").read_text() == "1"


def test_kill_all_signals_then_times_out(
    fake: FakeSystem, sleeper: subprocess.Popen[bytes]
) -> None:
    group = fake.driver().create("box", CgroupLimits())
    procs = _group_dir(group) / "cgroup.procs"
    # A plain file keeps listing the pid after the process dies, so kill_all
    # signals it and then runs into its timeout.
    procs.write_text(f"{sleeper.pid}\n")
    try:
        with pytest.raises(DeadlineExceeded, match=str(sleeper.pid)):
            group.kill_all(timeout=0.3)
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
    finally:
        procs.write_text("")


def test_list_and_destroy(fake: FakeSystem) -> None:
    driver = fake.driver()
    assert driver.list() == []
    first = driver.create("b-box", CgroupLimits())
    second = driver.create("a-box", CgroupLimits(memory_bytes=MIB))
    assert driver.list() == ["a-box", "b-box"]

    first.destroy()
    assert not _group_dir(first).exists()
    assert driver.list() == ["a-box"]
    second.destroy()
    second.destroy()
    assert driver.list() == []

    driver.remove_root()
    assert not (fake.own / "engine-fake").exists()
    assert fake.own.is_dir()


def test_remove_root_keeps_groups(fake: FakeSystem) -> None:
    driver = fake.driver()
    driver.create("box", CgroupLimits())
    driver.remove_root()
    assert (fake.own / "engine-fake" / "box").is_dir()


def test_remove_root_without_root(fake: FakeSystem) -> None:
    driver = fake.driver()
    driver.remove_root()
    assert driver.list() == []
