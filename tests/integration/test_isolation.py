"""Isolation of a sandbox from the host and from other sandboxes, on the real kernel.

Each test runs programs inside a sandbox of the shared ``engine`` fixture
(tests/conftest.py) and compares what they report with the host. The host
image bind-mounts the host's /usr, so python3 and the coreutils inside are the
host's own binaries.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from engine.core.engine import Engine
from engine.core.models import SandboxState, Stream
from engine.runtime import capabilities

if TYPE_CHECKING:
    from conftest import EngineRunner

# Entries of the sandbox's /dev: device nodes bound from the host, the devpts
# and shm mounts, and symlinks. "core" is the conventional link to /proc/kcore,
# which the /proc masks cover.
EXPECTED_DEV = {
    "null",
    "zero",
    "full",
    "random",
    "urandom",
    "tty",
    "pts",
    "shm",
    "ptmx",
    "fd",
    "stdin",
    "stdout",
    "stderr",
    "core",
}


def _json(engine: EngineRunner, sandbox_id: str, code: str) -> object:
    result = engine.python(sandbox_id, code)
    assert result.exit_code == 0, result.stderr.decode(errors="replace")
    return json.loads(result.stdout)


def _status_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _host_pids_in_cgroup(engine: EngineRunner, group_name: str) -> list[int]:
    """Scan the host's /proc for processes whose cgroup is the sandbox's group."""
    driver = engine.engine.cgroup_driver
    assert driver is not None
    suffix = f"/{os.path.basename(driver.root_dirs[0])}/{group_name}"
    found = []
    for pid in psutil.pids():
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            continue
        if any(line.split(":", 2)[2].endswith(suffix) for line in lines):
            found.append(pid)
    return found


def _find_host_process(engine: EngineRunner, sandbox_id: str, argv: list[str]) -> int:
    """Return the host pid of the process running ``argv`` in the sandbox's cgroup."""
    group = engine.cgroup_name(sandbox_id)
    matches: list[int] = []

    def found() -> bool:
        matches.clear()
        for pid in _host_pids_in_cgroup(engine, group):
            try:
                if psutil.Process(pid).cmdline() == argv:
                    matches.append(pid)
            except psutil.NoSuchProcess:
                continue
        return len(matches) == 1

    engine.wait_until(found, f"{argv} to appear in cgroup {group}")
    return matches[0]


# Processes and hostname.


def test_proc_lists_only_init_and_self(engine: EngineRunner, sandbox_id: str) -> None:
    listing = _json(
        engine,
        sandbox_id,
        "import json, os\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "print(json.dumps({'pids': pids, 'self': os.getpid()}))",
    )
    assert isinstance(listing, dict)
    assert listing["pids"] == [1, listing["self"]]


def test_ps_shows_init_and_itself(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["ps", "-e", "-o", "pid=,comm="])
    assert result.exit_code == 0, result.stderr
    rows = [line.split() for line in result.text.splitlines()]
    assert [row[1] for row in rows] == ["init", "ps"]
    assert rows[0][0] == "1"


def test_host_pids_not_visible(engine: EngineRunner, sandbox_id: str) -> None:
    host_pids = [os.getpid(), engine.zygote_pid]
    visible = _json(
        engine,
        sandbox_id,
        "import json, os\n"
        f"print(json.dumps([os.path.exists(f'/proc/{{p}}') for p in {host_pids}]))",
    )
    assert visible == [False, False]


def test_hostname_is_sandbox_id(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["hostname"])
    assert result.exit_code == 0
    assert result.text.strip() == sandbox_id


# Files.


def test_host_shadow_not_visible(engine: EngineRunner, sandbox_id: str) -> None:
    assert os.path.exists("/etc/shadow"), "the host has no /etc/shadow to hide"
    exists = _json(
        engine, sandbox_id, "import os; print(int(os.path.exists('/etc/shadow')))"
    )
    assert exists == 0


@pytest.mark.parametrize("directory", ["/root", "/home", "/run"])
def test_host_directory_not_visible(
    engine: EngineRunner, sandbox_id: str, directory: str
) -> None:
    assert os.listdir(directory), f"the host's {directory} is empty; nothing to hide"
    listing = _json(
        engine,
        sandbox_id,
        f"import json, os; print(json.dumps(os.listdir({directory!r})))",
    )
    assert listing == []


def test_host_var_not_visible(engine: EngineRunner, sandbox_id: str) -> None:
    host_entries = set(os.listdir("/var")) - {"tmp"}
    assert host_entries, "the host's /var has nothing but tmp"
    listing = _json(
        engine,
        sandbox_id,
        "import json, os\n"
        "print(json.dumps({'var': os.listdir('/var'), 'tmp': os.listdir('/var/tmp')}))",
    )
    assert isinstance(listing, dict)
    assert listing["var"] == ["tmp"]
    assert listing["tmp"] == []


def test_host_tmp_not_visible(engine: EngineRunner, sandbox_id: str) -> None:
    marker = Path(f"/tmp/engine-marker-{secrets.token_hex(6)}")
    marker.write_text("host\n")
    try:
        listing = _json(
            engine,
            sandbox_id,
            "import json, os\n"
            f"print(json.dumps({{'marker': os.path.exists({str(marker)!r}), "
            "'tmp': os.listdir('/tmp')}))",
        )
    finally:
        marker.unlink()
    assert isinstance(listing, dict)
    assert listing["marker"] is False
    assert listing["tmp"] == []


def test_usr_is_read_only(engine: EngineRunner, sandbox_id: str) -> None:
    errors = _json(
        engine,
        sandbox_id,
        "import json, os\n"
        "result = []\n"
        "for path, flags in (('/usr/engine-probe', os.O_WRONLY | os.O_CREAT),\n"
        "                    ('/usr/local/engine-probe', os.O_WRONLY | os.O_CREAT),\n"
        "                    ('/usr/bin/env', os.O_WRONLY | os.O_APPEND)):\n"
        "    try:\n"
        "        os.close(os.open(path, flags, 0o644))\n"
        "        result.append(0)\n"
        "    except OSError as error:\n"
        "        result.append(error.errno)\n"
        "print(json.dumps(result))",
    )
    assert isinstance(errors, list)
    assert errors[0] == errno.EROFS
    assert errors[1] == errno.EROFS
    # Host root owns /usr/bin/env, and it is unmapped inside, so the permission
    # check can fail before the read-only mount is consulted.
    assert errors[2] in (errno.EROFS, errno.EACCES)
    assert not os.path.exists("/usr/engine-probe")
    assert not os.path.exists("/usr/local/engine-probe")


def test_root_writes_stay_in_sandbox(engine: EngineRunner, sandbox_id: str) -> None:
    name = f"engine-probe-{secrets.token_hex(6)}"
    result = engine.run(
        sandbox_id,
        ["sh", "-c", f'echo inside > "/{name}" && echo inside > "/etc/{name}"'],
    )
    assert result.exit_code == 0, result.stderr
    image = engine.engine.images.resolve("host").path
    upper = engine.engine.layers.path / sandbox_id / "upper"
    assert not os.path.exists(f"/{name}")
    assert not os.path.exists(f"/etc/{name}")
    assert not (image / name).exists()
    assert not (image / "etc" / name).exists()
    assert (upper / name).read_text() == "inside\n"
    assert (upper / "etc" / name).read_text() == "inside\n"


def test_root_overlay_is_volatile(engine: EngineRunner, sandbox_id: str) -> None:
    # Field 5 of a mountinfo line is the mount point. After "-" come the file
    # system type, the source and the super block options.
    result = engine.run(sandbox_id, ["cat", "/proc/self/mountinfo"])
    assert result.exit_code == 0, result.stderr
    root = [
        line.split()
        for line in result.stdout.decode().splitlines()
        if line.split()[4] == "/"
    ]
    assert len(root) == 1
    fields = root[0]
    after = fields[fields.index("-") + 1 :]
    assert after[0] == "overlay"
    options = after[2].split(",")
    # Newer kernels show the option as fsync=volatile.
    assert "volatile" in options or "fsync=volatile" in options


# Network.


def test_only_loopback_interface(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox(block_network=True)
    names = _json(
        engine,
        sandbox_id,
        "import json, socket\n"
        "print(json.dumps([name for _, name in socket.if_nameindex()]))",
    )
    assert names == ["lo"]


def test_default_has_veth_interface(engine: EngineRunner, sandbox_id: str) -> None:
    names = _json(
        engine,
        sandbox_id,
        "import json, socket\n"
        "print(json.dumps([name for _, name in socket.if_nameindex()]))",
    )
    assert names == ["lo", "eth0"]


def test_proc_net_dev_lists_loopback(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox(block_network=True)
    result = engine.run(sandbox_id, ["cat", "/proc/net/dev"])
    assert result.exit_code == 0
    # The first two lines are column headers.
    interfaces = [line.split(":")[0].strip() for line in result.text.splitlines()[2:]]
    assert interfaces == ["lo"]


def test_host_loopback_unreachable(engine: EngineRunner, sandbox_id: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        outcome = _json(
            engine,
            sandbox_id,
            "import socket\n"
            "sock = socket.socket()\n"
            "sock.settimeout(5)\n"
            "try:\n"
            f"    sock.connect(('127.0.0.1', {port}))\n"
            "    print(0)\n"
            "except OSError as error:\n"
            "    print(error.errno)",
        )
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert outcome == errno.ECONNREFUSED


# Users, privileges and capabilities.


def test_host_uid_is_mapped(engine: EngineRunner, sandbox_id: str) -> None:
    process = engine.exec(sandbox_id, ["sleep", "30"])
    host_pid = _find_host_process(engine, sandbox_id, ["sleep", "30"])
    status = _status_fields(Path(f"/proc/{host_pid}/status").read_text())
    engine.call(engine.engine.kill(sandbox_id, process.pid))
    uid_base = engine.engine.config.uid_base
    assert uid_base != 0
    assert status["Uid"].split() == [str(uid_base)] * 4
    assert status["Gid"].split() == [str(uid_base)] * 4


def test_uid_inside_is_zero(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["id", "-u"])
    assert result.exit_code == 0
    assert result.text.strip() == "0"


def test_no_new_privs_and_seccomp(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["cat", "/proc/self/status"])
    status = _status_fields(result.text)
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


def test_bounding_set_is_kept_set(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["cat", "/proc/self/status"])
    status = _status_fields(result.text)
    bounding = set(capabilities.names(int(status["CapBnd"], 16)))
    effective = set(capabilities.names(int(status["CapEff"], 16)))
    assert bounding == set(capabilities.KEPT)
    assert effective == set(capabilities.KEPT)
    assert status["CapAmb"] == "0000000000000000"


# /proc, /sys and /dev.

_PROBE_PROC_FILE = """
import json, os, sys
path = sys.argv[1]
report = {"exists": os.path.exists(path)}
if report["exists"]:
    try:
        with open(path, "rb") as file:
            report["read"] = len(file.read(4096))
    except OSError as error:
        report["read_errno"] = error.errno
    try:
        os.close(os.open(path, os.O_WRONLY))
        report["write_errno"] = 0
    except OSError as error:
        report["write_errno"] = error.errno
print(json.dumps(report))
"""


@pytest.mark.parametrize("name", ["kcore", "sysrq-trigger", "keys"])
def test_proc_file_masked(engine: EngineRunner, sandbox_id: str, name: str) -> None:
    result = engine.run(
        sandbox_id, ["python3", "-c", _PROBE_PROC_FILE, f"/proc/{name}"]
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    if not report["exists"]:
        return
    assert report.get("read", 0) == 0, f"/proc/{name} is readable: {report}"
    assert report["write_errno"] != 0, f"/proc/{name} opens for writing: {report}"


def test_proc_sys_hostname_read_only(engine: EngineRunner, sandbox_id: str) -> None:
    report = _json(
        engine,
        sandbox_id,
        "import json, socket\n"
        "try:\n"
        "    with open('/proc/sys/kernel/hostname', 'w') as file:\n"
        "        file.write('engine-changed')\n"
        "    code = 0\n"
        "except OSError as error:\n"
        "    code = error.errno\n"
        "print(json.dumps({'errno': code, 'hostname': socket.gethostname()}))",
    )
    assert isinstance(report, dict)
    assert report["errno"] in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert report["hostname"] == sandbox_id


def test_sys_is_empty(engine: EngineRunner, sandbox_id: str) -> None:
    listing = _json(
        engine, sandbox_id, "import json, os; print(json.dumps(os.listdir('/sys')))"
    )
    assert listing == []


def test_dev_holds_minimal_set(engine: EngineRunner, sandbox_id: str) -> None:
    listing = _json(
        engine,
        sandbox_id,
        "import json, os\n"
        "print(json.dumps({'dev': os.listdir('/dev'), 'pts': os.listdir('/dev/pts')}))",
    )
    assert isinstance(listing, dict)
    assert set(listing["dev"]) == EXPECTED_DEV
    assert listing["pts"] == ["ptmx"]


def test_generated_etc_files(engine: EngineRunner, sandbox_id: str) -> None:
    files = _json(
        engine,
        sandbox_id,
        "import json\n"
        "names = ('hosts', 'hostname', 'resolv.conf', 'passwd')\n"
        "print(json.dumps({n: open('/etc/' + n).read() for n in names}))",
    )
    assert isinstance(files, dict)
    assert sandbox_id in files["hosts"]
    assert "127.0.0.1\tlocalhost" in files["hosts"]
    assert files["hostname"] == f"{sandbox_id}\n"
    assert "nameserver" not in files["resolv.conf"]
    assert files["passwd"].startswith("root:x:0:0:")


_PROBE_OTHER_SANDBOX = """
import json, os, sys
name = sys.argv[1]
commands = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                commands.append(file.read().decode())
        except OSError:
            pass
report = {
    "tmp": os.path.exists(f"/tmp/{name}"),
    "root": os.path.exists(f"/{name}"),
    "commands": commands,
}
print(json.dumps(report))
"""


def test_second_sandbox_isolated(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    first = new_sandbox()
    second = new_sandbox()
    name = f"engine-probe-{secrets.token_hex(6)}"
    wrote = engine.run(
        first, ["sh", "-c", f'echo first > "/tmp/{name}" && echo first > "/{name}"']
    )
    assert wrote.exit_code == 0
    engine.exec(first, ["sleep", "31"])
    _find_host_process(engine, first, ["sleep", "31"])
    seen = engine.run(second, ["python3", "-c", _PROBE_OTHER_SANDBOX, name])
    assert seen.exit_code == 0, seen.stderr
    report = json.loads(seen.stdout)
    assert report["tmp"] is False
    assert report["root"] is False
    assert not any("sleep" in command for command in report["commands"])


# PID 1 and the engine's helpers.


def test_kill_init_from_inside_ignored(engine: EngineRunner, sandbox_id: str) -> None:
    killed = engine.run(sandbox_id, ["sh", "-c", "kill -9 1; kill -TERM 1; sleep 0.2"])
    assert killed.exit_code == 0, killed.stderr
    after = engine.run(sandbox_id, ["cat", "/proc/1/comm"])
    assert after.exit_code == 0
    assert after.text.strip() == "init"
    assert engine.state(sandbox_id) == SandboxState.RUNNING


def test_init_memory_unreadable(engine: EngineRunner, sandbox_id: str) -> None:
    code = _json(
        engine,
        sandbox_id,
        "try:\n"
        "    open('/proc/1/mem', 'rb').read(1)\n"
        "    print(0)\n"
        "except OSError as error:\n"
        "    print(error.errno)",
    )
    assert code in (errno.EPERM, errno.EACCES)


def test_ptrace_attach_init_fails(engine: EngineRunner, sandbox_id: str) -> None:
    code = _json(
        engine,
        sandbox_id,
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.ptrace.restype = ctypes.c_long\n"
        "PTRACE_ATTACH = 16\n"
        "result = libc.ptrace(PTRACE_ATTACH, 1, None, None)\n"
        "print(0 if result == 0 else ctypes.get_errno())",
    )
    assert code in (errno.EPERM, errno.EACCES)


def test_engine_helpers_not_visible(engine: EngineRunner, sandbox_id: str) -> None:
    init = engine.engine.sandboxes[sandbox_id].init
    assert init is not None
    # PID 1's parent on the host is the zygote, outside the PID namespace.
    parent = psutil.Process(init.pid).ppid()
    assert engine.engine.spawner.process is not None
    assert parent == engine.engine.spawner.process.pid
    report = _json(
        engine,
        sandbox_id,
        "import json, os\n"
        "names = [open(f'/proc/{p}/comm').read().strip()\n"
        "         for p in os.listdir('/proc') if p.isdigit()]\n"
        f"print(json.dumps({{'names': names, "
        f"'pid': os.path.exists('/proc/{parent}')}}))",
    )
    assert isinstance(report, dict)
    assert sorted(report["names"]) == ["init", "python3"]
    assert report["pid"] is False


def test_init_exe_unreadable(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.python(
        sandbox_id,
        "import os\n"
        "for path in ('/proc/1/exe', '/proc/1/environ'):\n"
        "    try:\n"
        "        os.close(os.open(path, os.O_RDONLY))\n"
        "        print('opened')\n"
        "    except OSError as error:\n"
        "        print(error.errno)\n",
    )
    assert result.exit_code == 0, result.stderr
    assert result.text.split() == [str(errno.EACCES), str(errno.EACCES)]


# Descriptors.


def _open_fds(engine: EngineRunner, sandbox_id: str, **options: object) -> dict:
    # ls never reads stdin, so an open stdin pipe does not keep it waiting.
    process = engine.exec(sandbox_id, ["ls", "-l", "/proc/self/fd"], **options)
    output = engine.read(sandbox_id, process.pid).decode()
    info = engine.wait(sandbox_id, process.pid)
    assert info.exit_code == 0
    fds = {}
    for line in output.splitlines()[1:]:
        left, _, target = line.partition(" -> ")
        fds[int(left.split()[-1])] = target
    return {"pid": process.pid, "fds": fds}


def test_only_stdio_descriptors(engine: EngineRunner, sandbox_id: str) -> None:
    report = _open_fds(engine, sandbox_id)
    fds = report["fds"]
    assert sorted(fds) == [0, 1, 2, 3]
    assert fds[0] == "/dev/null"
    assert fds[1].startswith("pipe:")
    assert fds[2].startswith("pipe:")
    assert fds[3] == f"/proc/{report['pid']}/fd"


def test_only_stdio_descriptors_with_stdin(
    engine: EngineRunner, sandbox_id: str
) -> None:
    report = _open_fds(engine, sandbox_id, stdin=True)
    fds = report["fds"]
    assert sorted(fds) == [0, 1, 2, 3]
    assert fds[0].startswith("pipe:")
    assert fds[3] == f"/proc/{report['pid']}/fd"


def test_inotify_exhaustion_spares_host_root(
    engine: EngineRunner, sandbox_id: str
) -> None:
    """Per-user kernel limits of sandbox code are not charged to host root."""
    libc = ctypes.CDLL(None, use_errno=True)
    script = (
        "import ctypes, os, sys, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fds = []\n"
        "while len(fds) < 100000:\n"
        "    fd = libc.inotify_init1(0)\n"
        "    if fd < 0:\n"
        "        break\n"
        "    fds.append(fd)\n"
        "print(len(fds), ctypes.get_errno(), flush=True)\n"
        "time.sleep(30)\n"
    )
    process = engine.exec(sandbox_id, ["python3", "-c", script])
    chunks = engine.call(_first_line(engine.engine, sandbox_id, process.pid))
    count, error = (int(part) for part in chunks.split())
    try:
        host_fd = libc.inotify_init1(0)
        assert host_fd >= 0, os.strerror(ctypes.get_errno())
        os.close(host_fd)
    finally:
        engine.call(engine.engine.kill(sandbox_id, process.pid))
    assert count > 0
    assert error in (errno.EMFILE, errno.ENFILE)


async def _first_line(engine: Engine, sandbox_id: str, pid: int) -> str:
    data = b""
    async for chunk in engine.read_output(sandbox_id, pid, Stream.STDOUT):
        data += chunk.data
        if b"\n" in data or chunk.eof:
            break
    return data.decode()


def test_init_cmdline_names_no_host_path(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["cat", "/proc/1/cmdline"])
    assert result.exit_code == 0, result.stderr
    argv = result.stdout.split(b"\0")
    assert argv[0] == b"init"
    assert not any(b"/" in argument for argument in argv)
