"""What sandboxes leave behind on the host: mounts, cgroups, processes and directories.

Each test starts a private Engine on its own data dir and compares host state
before and after. The state is the host's mount table (/proc/self/mountinfo),
the cgroup directories under the engine root, the processes below this test
process, and the data dir's sandboxes/ directory.

Other programs on the machine may mount file systems while a test runs, so the
mount checks consider only mounts that name this test's data dir or one of its
sandbox ids. Every mount of a sandbox is below the data dir on the host, or
would be if it leaked. A running engine mounts its layer file system in the
zygote's mount namespace only, so none of its mounts is on the host but the
bind of fuse/mnt.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
from conftest import make_data_dir

from engine.core import engine as engine_module
from engine.core.engine import FUSE_CGROUP
from engine.core.models import SandboxState, TerminationReason
from engine.core.network import instance_names
from engine.errors import EngineError, FailedPrecondition, NotFound
from engine.runtime import cgroups, netlink
from engine.runtime.nftables import Nft
from engine.storage.layers import is_mount_point

if TYPE_CHECKING:
    from conftest import EngineRunner

# Seconds engine.close() may take with the zygote gone.
CLOSE_TIMEOUT = 10.0


def _host_mounts() -> set[str]:
    return set(Path("/proc/self/mountinfo").read_text().splitlines())


def _leaked_mounts(
    before: set[str], data_dir: Path, sandbox_ids: Iterable[str]
) -> list[str]:
    """Return new host mounts that name ``data_dir`` or a sandbox id.

    The running engine's shared bind of ``fuse/mnt`` on itself, below which
    FUSE servers mount, is not a leak, and the bucket mount tests check that
    it goes when the engine stops. The layer file system is mounted in the
    zygote's namespace only, so it counts as a leak here.
    """
    names = [str(data_dir), *sandbox_ids]
    engine_mount = str(data_dir / "fuse" / "mnt")
    leaked = []
    for line in _host_mounts() - before:
        if not any(name in line for name in names):
            continue
        if line.split(" ")[4] != engine_mount:
            leaked.append(line)
    return sorted(leaked)


def _descendants() -> set[int]:
    return {process.pid for process in psutil.Process().children(recursive=True)}


def _new_processes(before: set[int], runner: EngineRunner | None = None) -> set[int]:
    """Return live descendants of this process that did not exist in ``before``.

    Other Engines of this test session (the shared ``engine`` fixture, or a
    daemon started by another fixture) may fork pool supervisors at any time,
    so descendants of their zygotes are ignored.
    """
    own_zygote = runner.zygote_pid if runner is not None else None
    foreign = set()
    for process in psutil.Process().children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "engine.runtime.zygote" in cmdline and process.pid != own_zygote:
            foreign.add(process.pid)
    result = set()
    for pid in _descendants() - before:
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            ancestors = {parent.pid for parent in process.parents()}
        except psutil.NoSuchProcess:
            continue
        if not ancestors & foreign:
            result.add(pid)
    return result


def _cgroup_tree(runner: EngineRunner) -> dict[str, set[str]]:
    """Map each engine root directory to the directories below it."""
    driver = runner.engine.cgroup_driver
    assert driver is not None
    tree = {}
    for root in driver.root_dirs:
        below = set()
        for directory, subdirectories, _ in os.walk(root):
            below.update(os.path.join(directory, name) for name in subdirectories)
        tree[root] = below
    return tree


def _group_dirs(runner: EngineRunner, sandbox_id: str) -> list[str]:
    group = runner.engine.sandboxes[sandbox_id].cgroup
    assert group is not None
    return [os.path.dirname(path) for path in group.procs_files()]


def _start_workload(runner: EngineRunner, sandbox_id: str) -> None:
    """Run a process to its end, one that leaves a background child, and one more."""
    done = runner.run(sandbox_id, ["echo", "hello"])
    assert done.exit_code == 0
    # The background sleep must not inherit the pipes, or reading to EOF waits.
    script = "sleep 1000 >/dev/null 2>&1 & echo started"
    background = runner.run(sandbox_id, ["sh", "-c", script])
    assert background.stdout == b"started\n"
    runner.exec(sandbox_id, ["sleep", "1000"])


def _sandbox_host_pids(runner: EngineRunner, sandbox_id: str) -> list[int]:
    """Return the host pids of the sandbox: its cgroup's tasks and its PID 1."""
    init = runner.engine.sandboxes[sandbox_id].init
    assert init is not None
    return sorted({*runner.host_pids(sandbox_id), init.pid})


def _own_mount_namespace_root(pid: int) -> str:
    """Return the file system type of / in the mount namespace of host ``pid``."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return fields[fields.index("-") + 1]
    raise AssertionError(f"no / mount in /proc/{pid}/mountinfo")


def test_terminate_leaves_nothing(
    engine_factory: Callable[[], EngineRunner],
) -> None:
    mounts_before = _host_mounts()
    processes_before = _descendants()
    runner = engine_factory()
    data_dir = runner.data_dir
    runner.settle_pool()

    sandbox_ids = [runner.create() for _ in range(3)]
    for sandbox_id in sandbox_ids:
        _start_workload(runner, sandbox_id)
    # The warm pool sets up sandboxes of the same shape meanwhile.
    runner.settle_pool()
    host_pids = {sid: _sandbox_host_pids(runner, sid) for sid in sandbox_ids}
    group_dirs = {sid: _group_dirs(runner, sid) for sid in sandbox_ids}
    group_names = {runner.cgroup_name(sid) for sid in sandbox_ids}

    # The sandboxes' mounts exist, but only in their own mount namespaces.
    sleeper = max(host_pids[sandbox_ids[0]])
    assert _own_mount_namespace_root(sleeper) == "overlay"
    assert _leaked_mounts(mounts_before, data_dir, sandbox_ids) == []
    assert runner.sandbox_dirs() == set(sandbox_ids)
    assert all(os.path.isdir(d) for dirs in group_dirs.values() for d in dirs)

    for sandbox_id in sandbox_ids:
        runner.terminate(sandbox_id)

    assert _leaked_mounts(mounts_before, data_dir, sandbox_ids) == []
    for sandbox_id in sandbox_ids:
        assert [d for d in group_dirs[sandbox_id] if os.path.exists(d)] == []
        assert [p for p in host_pids[sandbox_id] if runner.pid_alive(p)] == []
    assert runner.sandbox_dirs() == set()
    runner.settle_pool()
    assert runner.cgroup_names() & group_names == set()
    assert runner.cgroup_names() == runner.pool_names()
    tree = _cgroup_tree(runner)
    for root, below in tree.items():
        expected_groups = {*runner.pool_names(), FUSE_CGROUP}
        assert below == {os.path.join(root, name) for name in expected_groups}
    # What remains is the zygote and the pool's unused supervisors.
    expected = {runner.zygote_pid, *runner.pool_pids()}
    assert _new_processes(processes_before, runner) == expected

    runner.close()
    assert [root for root in tree if os.path.exists(root)] == []
    assert _new_processes(processes_before) == set()
    assert _leaked_mounts(mounts_before, data_dir, sandbox_ids) == []


def test_close_terminates_live_sandboxes(
    engine_factory: Callable[[], EngineRunner],
) -> None:
    mounts_before = _host_mounts()
    processes_before = _descendants()
    runner = engine_factory()
    sandbox_ids = [runner.create() for _ in range(2)]
    for sandbox_id in sandbox_ids:
        _start_workload(runner, sandbox_id)
    host_pids = [p for sid in sandbox_ids for p in _sandbox_host_pids(runner, sid)]
    roots = list(_cgroup_tree(runner))

    runner.close()

    infos = [runner.engine.sandboxes[sid].info for sid in sandbox_ids]
    assert [info.state for info in infos] == [SandboxState.TERMINATED] * 2
    assert [info.reason for info in infos] == [TerminationReason.SHUTDOWN] * 2
    assert [pid for pid in host_pids if runner.pid_alive(pid)] == []
    assert _new_processes(processes_before) == set()
    assert [root for root in roots if os.path.exists(root)] == []
    assert runner.sandbox_dirs() == set()
    assert _leaked_mounts(mounts_before, runner.data_dir, sandbox_ids) == []


def test_zygote_crash_kills_sandboxes(
    engine_factory: Callable[[], EngineRunner],
) -> None:
    processes_before = _descendants()
    runner = engine_factory()
    sandbox_ids = [runner.create() for _ in range(2)]
    for sandbox_id in sandbox_ids:
        _start_workload(runner, sandbox_id)
    host_pids = [p for sid in sandbox_ids for p in _sandbox_host_pids(runner, sid)]
    pool_pids = runner.pool_pids()
    group_dirs = [d for sid in sandbox_ids for d in _group_dirs(runner, sid)]
    roots = list(_cgroup_tree(runner))

    os.kill(runner.zygote_pid, signal.SIGKILL)
    runner.wait_until(
        lambda: not any(runner.pid_alive(pid) for pid in host_pids),
        "the sandboxes' processes to die with the zygote",
        timeout=5,
    )
    runner.wait_until(
        lambda: all(
            runner.state(sid) == SandboxState.TERMINATED for sid in sandbox_ids
        ),
        "the engine to mark the sandboxes terminated",
        timeout=5,
    )

    reasons = [runner.engine.sandboxes[sid].info.reason for sid in sandbox_ids]
    assert reasons == [TerminationReason.ERROR] * 2
    # A warm sandbox whose PID 1 was still in setup when the zygote died
    # notices at its next step, so the pool's processes may take a moment.
    runner.wait_until(
        lambda: not any(runner.pid_alive(pid) for pid in pool_pids),
        "the pool's processes to die with the zygote",
        timeout=5,
    )
    assert [d for d in group_dirs if os.path.exists(d)] == []
    # Warm sandboxes die with the zygote too, and the engine discards them.
    runner.wait_until(
        lambda: set(os.listdir(runner.engine.config.sandboxes_dir)) == set(),
        "the warm sandboxes' layers to go",
        timeout=5,
    )

    # Without a zygote no sandbox can start, and create raises at once.
    started = time.monotonic()
    try:
        runner.create()
    except EngineError as error:
        failure: EngineError | None = error
    else:
        failure = None
    assert failure is not None
    assert time.monotonic() - started < 5.0
    runner.wait_until(
        lambda: set(os.listdir(runner.engine.config.sandboxes_dir)) == set(),
        "the failed sandbox's and the warm sandboxes' layers to go",
        timeout=5,
    )

    runner.close()
    assert [root for root in roots if os.path.exists(root)] == []
    assert _new_processes(processes_before) == set()


def test_close_prompt_after_zygote_crash(
    engine_factory: Callable[[], EngineRunner],
) -> None:
    runner = engine_factory()
    runner.settle_pool()
    os.kill(runner.zygote_pid, signal.SIGKILL)
    runner.wait_until(
        lambda: not any(runner.pid_alive(pid) for pid in runner.pool_pids()),
        "the pool's supervisors to die with the zygote",
        timeout=5,
    )
    started = time.monotonic()
    runner.close()
    assert time.monotonic() - started < CLOSE_TIMEOUT


def _abandon(runner: EngineRunner, fds_before: set[int]) -> None:
    """Drop an Engine the way a killed daemon would: no close, no cleanup.

    The event loop stops first, so the Engine cannot react to the zygote's
    death. Then the zygote is killed, and the descriptors that the daemon's
    death would have closed are closed here: sockets and the store through
    their objects, the data dir lock, and the output pipes.
    """
    engine = runner.engine
    runner.stop_loop(drain=False)
    assert engine.spawner.process is not None
    engine.spawner.process.kill()
    engine.spawner.process.wait()
    if engine.spawner.channel is not None:
        engine.spawner.channel.sock.close()
    for sandbox in engine.sandboxes.values():
        if sandbox.init is not None:
            sandbox.init.channel.sock.close()
            if sandbox.init.pidfd is not None:
                os.close(sandbox.init.pidfd)
                sandbox.init.pidfd = None
    if engine.pool is not None:
        for slot in engine.pool.slots():
            slot.control.close()
    if engine.store is not None:
        engine.store.close()
        engine.store = None
    if engine._lock_fd is not None:
        os.close(engine._lock_fd)
        engine._lock_fd = None
    # The output pipes' read ends belong to no object, only to loop callbacks.
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in fds_before:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            os.close(fd)


def test_restart_sweeps_unclean_stop(
    engine_factory: Callable[..., EngineRunner],
) -> None:
    processes_before = _descendants()
    fds_before = {int(name) for name in os.listdir("/proc/self/fd")}
    crashed = engine_factory()
    sandbox_ids = [crashed.create() for _ in range(2)]
    for sandbox_id in sandbox_ids:
        _start_workload(crashed, sandbox_id)
    host_pids = [p for sid in sandbox_ids for p in _sandbox_host_pids(crashed, sid)]
    old_groups = crashed.cgroup_names()
    group_dirs = [d for sid in sandbox_ids for d in _group_dirs(crashed, sid)]

    _abandon(crashed, fds_before)

    crashed.wait_until(
        lambda: not any(crashed.pid_alive(pid) for pid in host_pids),
        "the sandboxes' processes to die with the zygote",
        timeout=5,
    )
    assert _new_processes(processes_before) == set()
    # The crash left the sandboxes' cgroups behind. Their layer dirs went
    # with the layer file system, which was mounted only in the namespace of
    # the engine's processes, and no mount of it is left on the host.
    assert all(os.path.isdir(d) for d in group_dirs)
    assert crashed.sandbox_dirs() == set()
    assert not is_mount_point(crashed.data_dir / "sandboxes")

    restarted = engine_factory(crashed.data_dir)
    try:
        assert restarted.engine.store is not None
        stored = {info.sandbox_id: info for info in restarted.engine.store.sandboxes()}
        for sandbox_id in sandbox_ids:
            assert stored[sandbox_id].state == SandboxState.TERMINATED
            assert stored[sandbox_id].reason == TerminationReason.DAEMON_RESTART
        assert restarted.sandbox_dirs() == set()
        assert [d for d in group_dirs if os.path.exists(d)] == []
        assert restarted.cgroup_names() & old_groups == set()
        fresh = restarted.create()
        works = restarted.run(fresh, ["echo", "alive"])
        assert works.stdout == b"alive\n"
    finally:
        restarted.close()
    assert _new_processes(processes_before) == set()


def test_terminate_removes_deep_tree(engine: EngineRunner) -> None:
    """A tree thousands of levels deep does not keep a sandbox alive."""
    sandbox_id = engine.create()
    script = "import os\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\n"
    result = engine.python(sandbox_id, script, cwd="/root")
    assert result.info.exit_code == 0
    engine.terminate(sandbox_id)
    assert engine.state(sandbox_id) == SandboxState.TERMINATED
    assert sandbox_id not in engine.sandbox_dirs()


def test_terminated_sandbox_keeps_no_output(engine: EngineRunner) -> None:
    sandbox_id = engine.create()
    result = engine.run(sandbox_id, ["head", "-c", "1000000", "/dev/zero"])
    assert len(result.stdout) == 1_000_000
    engine.terminate(sandbox_id)
    chunks = engine.chunks(sandbox_id, result.info.pid)
    assert b"".join(chunk.data for chunk in chunks) == b""
    assert chunks[0].dropped == 1_000_000
    assert engine.engine.sandboxes[sandbox_id].output.used == 0


def test_terminate_then_settle_frees(engine: EngineRunner) -> None:
    sandbox_id = engine.create()
    engine.exec(sandbox_id, ["sleep", "1000"])
    host_pids = _sandbox_host_pids(engine, sandbox_id)
    init = engine.engine.sandboxes[sandbox_id].init
    assert init is not None
    sandbox_pids = [pid for pid in host_pids if pid != init.pid]
    group_dirs = _group_dirs(engine, sandbox_id)
    # Without settle: when terminate returns, every process of the sandbox
    # but PID 1 (engine code, which reaps them) has exited, is exiting or
    # has SIGKILL pending, so none runs code of its own again.
    engine.call(engine.engine.terminate_sandbox(sandbox_id))
    assert engine.state(sandbox_id) == SandboxState.TERMINATED
    assert sandbox_pids
    assert [pid for pid in sandbox_pids if not _dead_or_killed(pid)] == []
    engine.call(engine.engine.settle())
    assert [pid for pid in host_pids if engine.pid_alive(pid)] == []
    assert [d for d in group_dirs if os.path.exists(d)] == []
    assert sandbox_id not in engine.sandbox_dirs()


def test_terminate_kills_task_left_in_cgroup(engine: EngineRunner) -> None:
    """A task left in the cgroup at terminate is killed, and the group removed."""
    sandbox_id = engine.create()
    group_dirs = _group_dirs(engine, sandbox_id)
    # A host process in the group is a stand-in for a file worker that is
    # still exiting when the sandbox's own processes are gone.
    straggler = subprocess.Popen(["sleep", "1000"])
    try:
        for directory in group_dirs:
            Path(directory, "cgroup.procs").write_text(f"{straggler.pid}\n")
        engine.terminate(sandbox_id)
        assert straggler.wait(timeout=CLOSE_TIMEOUT) == -signal.SIGKILL
    finally:
        straggler.kill()
        straggler.wait()
    assert [d for d in group_dirs if os.path.exists(d)] == []


def test_terminate_removes_layer_files_when_delete_fails(
    engine: EngineRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox_id = engine.create()
    assert sandbox_id in engine.sandbox_dirs()

    def fail_remove(sandbox_id: str) -> None:
        raise OSError(errno.EIO, "BTRFS_IOC_SNAP_DESTROY failed")

    monkeypatch.setattr(engine.engine.layers, "remove", fail_remove)
    engine.terminate(sandbox_id)
    assert sandbox_id not in engine.sandbox_dirs()


def _dead_or_killed(pid: int) -> bool:
    """Return whether host ``pid`` has exited, is exiting or has SIGKILL pending."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # The ninth field after the command is the task's flags; 0x4 is PF_EXITING.
    flags = int(stat.rsplit(")", 1)[1].split()[6])
    if flags & 0x4:
        return True
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    if fields["State"].split()[0] in ("Z", "X"):
        return True
    sigkill = 1 << (signal.SIGKILL - 1)
    pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return bool(pending & sigkill)


def test_oldest_terminated_sandboxes_forgotten(
    engine_factory: Callable[[], EngineRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "MAX_REMEMBERED_SANDBOXES", 3)
    runner = engine_factory()
    sandbox_ids = []
    for _ in range(5):
        sandbox_id = runner.create()
        runner.terminate(sandbox_id)
        sandbox_ids.append(sandbox_id)
    live = runner.create()
    remembered = set(runner.engine.sandboxes)
    assert remembered == {live, *sandbox_ids[2:]}
    for forgotten in sandbox_ids[:2]:
        with pytest.raises(NotFound):
            runner.call(runner.engine.get_sandbox(forgotten))


def test_failed_start_leaves_nothing(
    engine_factory: Callable[..., EngineRunner],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The engine-init build is the last step before the zygote starts, after
    # the FUSE mount, the cgroups, the bridge, the nftables table and the layer
    # file system exist. Its failure, as without a C compiler, is injected.
    def no_compiler(*_: object) -> Path:
        raise FailedPrecondition("no C compiler found to build the sandbox init")

    data_dir = make_data_dir()
    bridge, _, table = instance_names(data_dir)
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]
    driver = cgroups.detect(f"engine-{digest}")
    processes_before = _descendants()
    fds_before = set(os.listdir("/proc/self/fd"))
    mounts_before = _host_mounts()
    monkeypatch.setattr(engine_module.initbin, "build", no_compiler)

    with pytest.raises(FailedPrecondition, match="no C compiler"):
        engine_factory(data_dir)

    assert _leaked_mounts(mounts_before, data_dir, []) == []
    assert str(data_dir / "fuse" / "mnt") not in Path("/proc/self/mounts").read_text()
    assert bridge not in netlink.link_names()
    assert table not in _nft_tables()
    assert [d for d in driver.root_dirs if os.path.exists(d)] == []
    assert _new_processes(processes_before) == set()
    # The data dir lock and the store's database are closed.
    assert set(os.listdir("/proc/self/fd")) - fds_before == set()


def _nft_tables() -> list[str]:
    nft = Nft()
    try:
        return nft.table_names("inet")
    finally:
        nft.close()
