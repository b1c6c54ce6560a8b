"""Escape attempts against the sandbox, each checked for its effect on the host.

Hostile images are directories written straight into the engine's image store:
a static busybox (Debian's busybox-static) plus whatever the attack needs, such
as symlinks where the engine mounts /dev or /proc, device nodes, or a setuid
program. The two setuid probes are tiny x86-64 ELF files assembled below, since
busybox drops setuid privileges on its own and would prove nothing.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from engine.errors import EngineError, InvalidArgument
from engine.sdk import Sandbox
from engine.storage.images import shift_ownership
from tests.conftest import EngineRunner
from tests.integration.conftest import Daemon, free_port

BUSYBOX = "/bin/busybox"
# Exit status of the launcher probe when its execve of the setuid probe fails.
LAUNCHER_EXEC_FAILED = 99
PROBE_UID = 1000

# The directories the engine mounts over or creates in every sandbox.
MOUNT_POINTS = ("dev", "proc", "tmp", "etc", "sys", "root")


# -- hostile images ---------------------------------------------------------


def _elf(code: bytes) -> bytes:
    """Wrap x86-64 machine code in a minimal static ELF executable."""
    base = 0x400000
    header_size = 64 + 56
    size = header_size + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, base + header_size, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return header + program + code


def euid_probe() -> bytes:
    """An ELF program that exits with its effective uid, modulo 256."""
    code = (
        b"\xb8\x6b\x00\x00\x00"  # mov eax, 107 (geteuid)
        b"\x0f\x05"  # syscall
        b"\x89\xc7"  # mov edi, eax
        b"\xb8\x3c\x00\x00\x00"  # mov eax, 60 (exit)
        b"\x0f\x05"  # syscall
    )
    return _elf(code)


def launcher_probe(target: bytes, uid: int) -> bytes:
    """An ELF program that calls setuid(uid) and then execs ``target``."""
    before_lea = (
        b"\xbf" + struct.pack("<I", uid)  # mov edi, uid
    ) + (
        b"\xb8\x69\x00\x00\x00"  # mov eax, 105 (setuid)
        b"\x0f\x05"  # syscall
    )
    after_lea = (
        b"\x31\xf6"  # xor esi, esi
        b"\x31\xd2"  # xor edx, edx
        b"\xb8\x3b\x00\x00\x00"  # mov eax, 59 (execve)
        b"\x0f\x05"  # syscall
    )
    after_lea += b"\xbf" + struct.pack("<I", LAUNCHER_EXEC_FAILED)  # mov edi, 99
    after_lea += b"\xb8\x3c\x00\x00\x00\x0f\x05"  # mov eax, 60 (exit); syscall
    # lea rdi, [rip + disp32], where rip is the address after the lea.
    lea = b"\x48\x8d\x3d" + struct.pack("<i", len(after_lea))
    return _elf(before_lea + lea + after_lea + target + b"\0")


def make_image(engine: EngineRunner, prepare: Callable[[Path], None]) -> str:
    """Write a busybox image, let ``prepare`` alter it, and shift its owners.

    Returns the image's name. Files are owned by the sandbox's root, as a
    built image's are, so that only the engine's mounts stand in the way.
    """
    name = f"hostile-{secrets.token_hex(4)}"
    root = engine.engine.images.images_dir / name
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "stat", "sha256sum", "mknod"):
        (root / "bin" / applet).symlink_to("busybox")
    prepare(root)
    config = engine.engine.config
    shift_ownership(root, config.uid_base, config.uid_count)
    return name


def tree_digest(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Map each path below ``root`` to its mode, owner, group and content hash."""
    digest: dict[str, tuple[int, int, int, str]] = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            else:
                content = ""
            relative = os.path.relpath(path, root)
            digest[relative] = (info.st_mode, info.st_uid, info.st_gid, content)
    return digest


def mounts_under(path: Path) -> list[str]:
    """Return the host's mount points at or below ``path``."""
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A host directory with one known file, for images that aim at it."""
    path = Path(f"/tmp/engine-escape-target-{secrets.token_hex(4)}")
    path.mkdir(mode=0o777)
    (path / "marker").write_text("host\n")
    yield path
    shutil.rmtree(path)


def host_dir_unchanged(path: Path) -> bool:
    return [entry.name for entry in path.iterdir()] == ["marker"]


# -- /proc/PID/exe of engine helpers ----------------------------------------


def test_init_exe_not_writable(engine: EngineRunner, sandbox_id: str) -> None:
    opened = engine.python(
        sandbox_id,
        "import os\n"
        "try:\n"
        "    os.open('/proc/1/exe', os.O_WRONLY)\n"
        "    print('opened')\n"
        "except OSError as error:\n"
        "    print(error.errno)\n",
    )
    assert opened.text == f"{errno.EACCES}\n"


def test_own_exe_not_writable(engine: EngineRunner, sandbox_id: str) -> None:
    target = os.path.realpath("/usr/bin/python3")
    before = hashlib.sha256(Path(target).read_bytes()).hexdigest()
    opened = engine.python(
        sandbox_id,
        "import os\n"
        "try:\n"
        "    os.open('/proc/self/exe', os.O_WRONLY | os.O_APPEND)\n"
        "    print('opened')\n"
        "except OSError as error:\n"
        "    print(error.errno)\n",
    )
    after = hashlib.sha256(Path(target).read_bytes()).hexdigest()
    refusals = (errno.EACCES, errno.EROFS, errno.ETXTBSY)
    assert opened.text in [f"{code}\n" for code in refusals]
    assert after == before


async def _slow_chunks(release: threading.Event) -> AsyncIterator[bytes]:
    yield b"first"
    while not release.is_set():
        await asyncio.sleep(0.02)


# Lists every process but the probe itself, with the result of opening its exe
# for writing and its mem for reading.
_HELPER_PROBE = r"""
import json, os
report = {}
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == os.getpid():
        continue
    results = []
    for path, flags in (("exe", os.O_WRONLY), ("mem", os.O_RDONLY)):
        try:
            os.close(os.open(f"/proc/{name}/{path}", flags))
            results.append("opened")
        except OSError as error:
            results.append(error.errno)
    report[name] = results
print(json.dumps(report))
"""


def _file_workers(engine: EngineRunner, init_pid: int) -> list[int]:
    """Return the zygote's children, other than PID 1, in PID 1's user namespace."""
    assert engine.engine.spawner.process is not None
    zygote = psutil.Process(engine.engine.spawner.process.pid)
    user_namespace = os.readlink(f"/proc/{init_pid}/ns/user")
    workers = []
    for child in zygote.children():
        try:
            if child.pid != init_pid and (
                os.readlink(f"/proc/{child.pid}/ns/user") == user_namespace
            ):
                workers.append(child.pid)
        except OSError:
            continue
    return workers


def test_file_worker_invisible(engine: EngineRunner, sandbox_id: str) -> None:
    init = engine.engine.sandboxes[sandbox_id].init
    assert init is not None
    release = threading.Event()
    upload = asyncio.run_coroutine_threadsafe(
        engine.engine.files.write_file(sandbox_id, "/tmp/slow", _slow_chunks(release)),
        engine.loop,
    )
    try:
        # The upload's worker runs in the sandbox's namespaces until it ends.
        engine.wait_until(
            lambda: bool(_file_workers(engine, init.pid)), "the upload's worker"
        )
        workers = _file_workers(engine, init.pid)
        worker_namespaces = [os.readlink(f"/proc/{pid}/ns/pid") for pid in workers]
        report = json.loads(engine.python(sandbox_id, _HELPER_PROBE).text)
    finally:
        release.set()
        upload.result(30)
    # Sandbox code sees PID 1 and itself, not the worker.
    assert list(report) == ["1"]
    assert report["1"] == [errno.EACCES, errno.EACCES]
    sandbox_pids = os.readlink(f"/proc/{init.pid}/ns/pid")
    assert worker_namespaces
    assert sandbox_pids not in worker_namespaces


# -- working directory through a descriptor ---------------------------------


@pytest.mark.parametrize(
    "cwd", ["/proc/self/fd/3", "/proc/self/fd/5", "/proc/1/cwd", "/proc/self/root"]
)
def test_magic_link_cwd_rejected(
    engine: EngineRunner, sandbox_id: str, cwd: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        engine.exec(sandbox_id, ["pwd"], cwd=cwd)
    assert "magic link" in str(raised.value)
    assert cwd in str(raised.value)


def test_symlinked_cwd_still_works(engine: EngineRunner, sandbox_id: str) -> None:
    linked = engine.run(
        sandbox_id, ["sh", "-c", "mkdir -p /tmp/real && ln -s real /tmp/link"]
    )
    assert linked.exit_code == 0, linked.stderr
    result = engine.run(sandbox_id, ["pwd"], cwd="/tmp/link")
    assert result.exit_code == 0
    assert result.text == "/tmp/real\n"


# -- cgroups, devices and kernel interfaces ---------------------------------


def test_cgroup_mount_for_release_agent_denied(
    engine: EngineRunner, sandbox_id: str
) -> None:
    result = engine.run(
        sandbox_id,
        [
            "sh",
            "-c",
            "mkdir -p /tmp/cg && mount -t cgroup -o memory cgroup /tmp/cg;"
            " echo status=$?; ls /sys; ls /tmp/cg",
        ],
    )
    assert "status=0" not in result.text
    assert "release_agent" not in result.text


def test_cgroup_namespace_root(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(sandbox_id, ["cat", "/proc/self/cgroup"])
    paths = {line.split(":", 2)[2] for line in result.text.splitlines()}
    assert paths == {"/"}


def test_mknod_denied(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.run(
        sandbox_id,
        ["sh", "-c", "mknod /tmp/mem c 1 1; mknod /tmp/disk b 8 0; ls /tmp"],
    )
    assert "mem" not in result.text
    assert "disk" not in result.text


@pytest.mark.parametrize(
    "path", ["/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/vda", "/dev/sda"]
)
def test_host_device_absent(engine: EngineRunner, sandbox_id: str, path: str) -> None:
    result = engine.run(sandbox_id, ["test", "-e", path])
    assert result.exit_code == 1


def test_image_device_nodes_unusable(engine: EngineRunner) -> None:
    def add_devices(root: Path) -> None:
        os.mknod(root / "mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))
        os.mknod(root / "kmsg", stat.S_IFCHR | 0o666, os.makedev(1, 11))
        os.mknod(root / "disk", stat.S_IFBLK | 0o666, os.makedev(254, 0))

    image = make_image(engine, add_devices)
    sandbox_id = engine.create(image=image)
    try:
        for name in ("mem", "kmsg", "disk"):
            listed = engine.run(sandbox_id, ["ls", "-l", f"/{name}"])
            assert listed.exit_code == 0, listed.stderr
            read = engine.run(sandbox_id, ["cat", f"/{name}"])
            assert read.exit_code != 0, name
            assert b"Permission denied" in read.stderr, (name, read.stderr)
    finally:
        engine.terminate(sandbox_id)


def test_setuid_image_binary_keeps_uid(engine: EngineRunner) -> None:
    def add_probes(root: Path) -> None:
        (root / "suid").write_bytes(euid_probe())
        (root / "suid").chmod(0o4755)
        (root / "launch").write_bytes(launcher_probe(b"/suid", PROBE_UID))
        (root / "launch").chmod(0o755)

    image = make_image(engine, add_probes)
    sandbox_id = engine.create(image=image)
    try:
        mode = engine.run(sandbox_id, ["stat", "-c", "%a %u", "/suid"])
        assert mode.text == "4755 0\n"
        direct = engine.run(sandbox_id, ["/suid"])
        assert direct.exit_code == 0
        launched = engine.run(sandbox_id, ["/launch"])
        assert launched.exit_code != LAUNCHER_EXEC_FAILED
        assert launched.exit_code == PROBE_UID % 256
    finally:
        engine.terminate(sandbox_id)


# -- symlinks in images where the engine mounts -----------------------------


@pytest.mark.parametrize("mount_point", MOUNT_POINTS)
def test_image_mount_point_symlink_to_host(
    engine: EngineRunner, host_dir: Path, mount_point: str
) -> None:
    def aim(root: Path) -> None:
        (root / mount_point).symlink_to(host_dir)

    image = make_image(engine, aim)
    sandbox_id = engine.create(image=image)
    try:
        wrote = engine.run(
            sandbox_id, ["sh", "-c", f"echo sandbox > /{mount_point}/written; ls /"]
        )
        assert host_dir_unchanged(host_dir)
        assert mounts_under(host_dir) == []
        assert wrote.info.exit_code is not None, "the sandbox ran no command"
    finally:
        engine.terminate(sandbox_id)
    assert host_dir_unchanged(host_dir)
    assert mounts_under(host_dir) == []


@pytest.mark.parametrize("mount_point", MOUNT_POINTS)
def test_image_mount_point_dotdot_symlink(
    engine: EngineRunner, host_dir: Path, mount_point: str
) -> None:
    def aim(root: Path) -> None:
        (root / mount_point).symlink_to("../" * 12 + str(host_dir).lstrip("/"))

    image = make_image(engine, aim)
    sandbox_id = engine.create(image=image)
    try:
        engine.run(sandbox_id, ["sh", "-c", f"echo sandbox > /{mount_point}/written"])
        assert host_dir_unchanged(host_dir)
    finally:
        engine.terminate(sandbox_id)
    assert host_dir_unchanged(host_dir)


def test_image_volume_path_symlink_to_host(
    engine: EngineRunner, host_dir: Path
) -> None:
    from engine.core.models import VolumeMount

    def aim(root: Path) -> None:
        (root / "data").symlink_to(host_dir)

    volume = f"escape-{secrets.token_hex(4)}"
    image = make_image(engine, aim)
    sandbox_id = engine.create(
        image=image, volumes=(VolumeMount(volume, "/data/inner"),)
    )
    try:
        wrote = engine.run(sandbox_id, ["sh", "-c", "echo sandbox > /data/inner/file"])
        assert wrote.exit_code == 0, wrote.stderr
        assert host_dir_unchanged(host_dir)
    finally:
        engine.terminate(sandbox_id)
    assert host_dir_unchanged(host_dir)


def test_image_etc_fifos_replaced(engine: EngineRunner) -> None:
    # Opening a FIFO for writing blocks until a reader comes, so writing
    # through one would hang the setup.
    def add_fifos(root: Path) -> None:
        (root / "etc").mkdir()
        for name in ("hosts", "hostname", "resolv.conf", "passwd", "group"):
            os.mkfifo(root / "etc" / name)

    image = make_image(engine, add_fifos)
    sandbox_id = engine.create(image=image)
    try:
        listed = engine.run(sandbox_id, ["sh", "-c", "cat /etc/hostname /etc/passwd"])
        assert listed.exit_code == 0, listed.stderr
        assert listed.text.startswith(f"{sandbox_id}\nroot:x:0:0:")
    finally:
        engine.terminate(sandbox_id)


def test_long_workdir_through_image_symlink(engine: EngineRunner) -> None:
    # The workdir fits in PATH_MAX, but the path that the symlink resolves
    # to does not; the kernel allows that.
    def add_link(root: Path) -> None:
        (root / "a-longer-directory-name").mkdir()
        (root / "w").symlink_to("a-longer-directory-name")

    image = make_image(engine, add_link)
    workdir = "/w"
    while len(workdir) + 201 < 4096:
        workdir += "/" + "a" * 200
    workdir += "/" + "b" * (4095 - len(workdir) - 1)
    assert len(workdir) == 4095
    sandbox_id = engine.create(image=image, workdir=workdir)
    try:
        wrote = engine.run(sandbox_id, ["sh", "-c", "echo here > marker"])
        assert wrote.exit_code == 0, wrote.stderr
        # Every exec starts in the workdir.
        read = engine.run(sandbox_id, ["cat", "marker"])
        assert read.text == "here\n"
    finally:
        engine.terminate(sandbox_id)


# -- shared image files -----------------------------------------------------


def test_image_files_unchanged_by_hostile_writes(engine: EngineRunner) -> None:
    image = make_image(engine, lambda root: (root / "shared").write_text("original\n"))
    image_root = engine.engine.images.images_dir / image
    before = tree_digest(image_root)
    attacker = engine.create(image=image)
    try:
        script = (
            "echo evil > /shared; echo evil >> /bin/busybox; chmod 777 /bin;"
            " rm -f /bin/ls; ln -sf /shared /bin/cat; mknod /bin/node p;"
            " truncate -s 0 /shared; echo done"
        )
        attacked = engine.run(attacker, ["/bin/busybox", "sh", "-c", script])
        assert attacked.text.endswith("done\n"), attacked.stderr
        seen = engine.run(attacker, ["/bin/busybox", "cat", "/shared"])
        assert seen.text == ""
    finally:
        engine.terminate(attacker)
    assert tree_digest(image_root) == before
    victim = engine.create(image=image)
    try:
        read = engine.run(victim, ["cat", "/shared"])
        assert read.text == "original\n"
        listed = engine.run(victim, ["ls", "/bin"])
        assert "ls" in listed.text.split()
    finally:
        engine.terminate(victim)


def test_host_usr_unchanged_by_hostile_writes(
    engine: EngineRunner, sandbox_id: str
) -> None:
    target = Path(os.path.realpath("/usr/bin/env"))
    before = (target.stat().st_mode, hashlib.sha256(target.read_bytes()).hexdigest())
    result = engine.run(
        sandbox_id,
        [
            "sh",
            "-c",
            f"echo x >> {target}; chmod 777 {target}; rm -f {target};"
            f" mv {target} /tmp/env; touch {target}; echo done",
        ],
    )
    assert result.text == "done\n"
    after = (target.stat().st_mode, hashlib.sha256(target.read_bytes()).hexdigest())
    assert after == before


# -- other sandboxes --------------------------------------------------------


_LISTEN = r"""
import socket, sys, time
abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
abstract.bind("\0" + sys.argv[1])
abstract.listen()
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("127.0.0.1", int(sys.argv[2])))
tcp.listen()
open("/tmp/ready", "w").close()
time.sleep(60)
"""

_CONNECT = r"""
import socket, sys
results = []
for family, address in ((socket.AF_UNIX, "\0" + sys.argv[1]),
                        (socket.AF_INET, ("127.0.0.1", int(sys.argv[2])))):
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(2)
    try:
        client.connect(address)
        results.append("connected")
    except OSError as error:
        results.append(type(error).__name__)
print(" ".join(results))
"""


def test_other_sandbox_sockets_unreachable(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    first = new_sandbox()
    second = new_sandbox()
    name = f"engine-escape-{secrets.token_hex(4)}"
    port = "47211"
    engine.exec(first, ["python3", "-c", _LISTEN, name, port])
    engine.wait_until(
        lambda: engine.run(first, ["test", "-e", "/tmp/ready"]).exit_code == 0,
        "the listener in the first sandbox",
    )
    itself = engine.run(first, ["python3", "-c", _CONNECT, name, port])
    assert itself.text == "connected connected\n"
    other = engine.run(second, ["python3", "-c", _CONNECT, name, port])
    assert other.text == "ConnectionRefusedError ConnectionRefusedError\n"


def test_other_sandbox_processes_unkillable(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    first = new_sandbox()
    second = new_sandbox()
    sleeper = engine.exec(first, ["sleep", "60"])
    host_pids = engine.host_pids(first)
    targets = " ".join(str(pid) for pid in [*host_pids, sleeper.pid])
    engine.run(second, ["sh", "-c", f"for p in {targets}; do kill -9 $p; done"])
    info = engine.call(engine.engine.list_processes(first))
    running = [process.pid for process in info if process.exit_code is None]
    assert sleeper.pid in running


# -- the daemon's own sockets -----------------------------------------------


_DAEMON_PROBE = r"""
import os, socket, sys
path, port = sys.argv[1], int(sys.argv[2])
print("exists" if os.path.exists(path) else "absent")
with open("/proc/net/unix") as table:
    print("listed" if path in table.read() else "unlisted")
for family, address in ((socket.AF_UNIX, path), (socket.AF_INET, ("127.0.0.1", port))):
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(2)
    try:
        client.connect(address)
        print("connected")
    except OSError as error:
        print(type(error).__name__)
"""


def test_daemon_sockets_unreachable(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    daemon = daemon_factory("--listen", f"127.0.0.1:{port}")
    with Sandbox(address=daemon.address).create() as sandbox:
        process = sandbox.process.exec(
            "python3", "-c", _DAEMON_PROBE, str(daemon.socket_path), str(port)
        )
        assert process.wait() == 0
        lines = process.stdout.read().split()
    assert lines[0] == "absent"
    assert lines[1] == "unlisted"
    assert lines[2] == "FileNotFoundError"
    assert lines[3] == "ConnectionRefusedError"


_SWAPPER = r"""
import os, sys, time
base = sys.argv[1]
end = time.monotonic() + float(sys.argv[2])
os.makedirs(f"{base}/real", exist_ok=True)
while time.monotonic() < end:
    for target in ("/", "real", "../../../../"):
        try:
            os.symlink(target, f"{base}/.next")
            os.replace(f"{base}/.next", f"{base}/sub")
        except OSError:
            pass
"""


def test_volume_mount_target_swapped_concurrently(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    from engine.core.models import VolumeMount

    shared = f"race-{secrets.token_hex(4)}"
    inner = f"inner-{secrets.token_hex(4)}"
    attacker = new_sandbox(volumes=(VolumeMount(shared, "/data"),))
    engine.exec(attacker, ["python3", "-c", _SWAPPER, "/data", "10"])
    root_before = sorted(os.listdir("/"))
    victims = []
    for _ in range(5):
        try:
            victims.append(
                engine.create(
                    volumes=(
                        VolumeMount(shared, "/x"),
                        VolumeMount(inner, "/x/sub"),
                    )
                )
            )
        except EngineError:
            continue  # A clean failure is fine; the host must stay untouched.
    try:
        for victim in victims:
            engine.run(victim, ["sh", "-c", "echo victim > /x/sub/marker"])
        assert sorted(os.listdir("/")) == root_before
        assert not Path("/marker").exists()
    finally:
        for victim in victims:
            engine.terminate(victim)
