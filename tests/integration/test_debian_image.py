"""A real build of the debian image with debootstrap from the host's Debian mirror.

The module builds the image once (about 40 s here) and removes it at the end.
The interrupted-build test downloads again, because it stops a second build
after debootstrap has mounted /proc inside the target.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import Config
from engine.core.engine import Engine
from engine.core.models import SandboxSpec, Stream
from engine.errors import AlreadyExists, InvalidArgument, Unavailable
from engine.storage.images import ImageStore

pytestmark = pytest.mark.slow

UID_BASE = 100000
UID_COUNT = 65536


class Built:
    def __init__(
        self, store: ImageStore, root: Path, progress: list[str], started: float
    ) -> None:
        self.store = store
        self.root = root
        self.progress = progress
        self.started = started


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    # A data dir below /tmp with mode 0755, because sandbox supervisors run as
    # UID_BASE on the host and must reach the image through every parent.
    data_dir = Path(tempfile.mkdtemp(prefix="eng-img-", dir="/tmp"))
    data_dir.chmod(0o755)
    store = ImageStore(data_dir, uid_base=UID_BASE, uid_count=UID_COUNT)
    progress: list[str] = []
    started = time.time()
    try:
        info = store.build("debian", progress=progress.append)
        yield Built(store, info.path, progress, started)
    finally:
        if (store.images_dir / "debian").exists():
            store.remove("debian")
        shutil.rmtree(data_dir)


def _build_dirs(store: ImageStore) -> list[str]:
    if not store.images_dir.exists():
        return []
    return [name for name in os.listdir(store.images_dir) if ".build-" in name]


def _mount_points_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return [point for point in points if point.startswith(str(path))]


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry))
    return pids


def test_debian_progress_lines(built: Built) -> None:
    assert any(line.startswith("Retrieving ") for line in built.progress)
    assert any(
        line.startswith("[1/") and " Unpacking " in line for line in built.progress
    )
    assert any(line.startswith("Shifting ownership") for line in built.progress)


def test_debian_has_python3(built: Built) -> None:
    python = built.root / "usr" / "bin" / "python3"
    assert os.path.lexists(python)
    target = os.readlink(python) if python.is_symlink() else "python3"
    assert (python.parent / target).is_file()
    result = subprocess.run(
        [
            shutil.which("chroot") or "/usr/sbin/chroot",
            str(built.root),
            "/usr/bin/python3",
            "-c",
            "import sys; print(sys.version_info[0])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"


def test_debian_ownership_shifted(built: Built) -> None:
    assert os.stat(built.root).st_uid == UID_BASE
    assert os.lstat(built.root / "usr" / "bin" / "python3").st_uid == UID_BASE
    # /etc/shadow is root:shadow, and the shadow group is gid 42 in Debian.
    assert os.stat(built.root / "etc" / "shadow").st_gid == UID_BASE + 42
    outside = []
    for dirpath, dirnames, filenames in os.walk(built.root):
        for name in (*dirnames, *filenames):
            info = os.lstat(os.path.join(dirpath, name))
            for owner in (info.st_uid, info.st_gid):
                if not UID_BASE <= owner < UID_BASE + UID_COUNT:
                    outside.append(os.path.join(dirpath, name))
    assert outside == []


def test_debian_setuid_bits_kept(built: Built) -> None:
    su = os.stat(built.root / "usr" / "bin" / "su")
    assert su.st_mode & stat.S_ISUID
    assert su.st_uid == UID_BASE


def test_debian_has_no_host_files(built: Built) -> None:
    assert not os.path.lexists(built.root / "etc" / "hostname")
    assert not os.path.lexists(built.root / "etc" / "resolv.conf")
    assert not (built.root / "debootstrap").exists()
    assert list((built.root / "var" / "cache" / "apt" / "archives").glob("*.deb")) == []
    devices = []
    for dirpath, _dirnames, filenames in os.walk(built.root):
        for name in filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                devices.append(os.path.join(dirpath, name))
    assert devices == []


def test_debian_build_leaves_no_mounts(built: Built) -> None:
    assert _mount_points_under(built.store.data_dir) == []
    assert _build_dirs(built.store) == []


def test_debian_listed_and_resolved(built: Built) -> None:
    listed = {info.name: info for info in built.store.list()}
    assert "debian" in listed
    info = listed["debian"]
    assert info.kind == "rootfs"
    assert info.path == built.root
    assert info.size_bytes > 50 * 1024 * 1024
    assert info.created_at >= built.started
    image = built.store.resolve("debian")
    assert image.path == built.root
    assert image.binds == ()


def test_debian_build_twice_rejected(built: Built) -> None:
    with pytest.raises(AlreadyExists) as caught:
        built.store.build("debian")
    assert "engine image rm debian" in str(caught.value)


async def _run_in_debian(data_dir: Path, script: str) -> tuple[int, bytes, bytes]:
    """Create a sandbox from the debian image, run ``script`` with sh, terminate it."""
    engine = Engine(Config.from_data_dir(data_dir))
    await engine.start()
    try:
        sandbox = await engine.create_sandbox(SandboxSpec(image="debian"))
        info = await engine.exec(sandbox.sandbox_id, ["sh", "-c", script])
        streams = []
        for stream in (Stream.STDOUT, Stream.STDERR):
            chunks = engine.read_output(sandbox.sandbox_id, info.pid, stream)
            streams.append(b"".join([chunk.data async for chunk in chunks]))
        final = await engine.wait(sandbox.sandbox_id, info.pid)
        await engine.terminate_sandbox(sandbox.sandbox_id)
    finally:
        await engine.close()
    assert final.exit_code is not None
    return final.exit_code, streams[0], streams[1]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for directory, names, files in sorted(os.walk(root)):
        names.sort()
        for name in sorted(files):
            path = Path(directory, name)
            status = path.lstat()
            digest.update(
                f"{path}:{status.st_mode}:{status.st_uid}:{status.st_size}".encode()
            )
            if stat.S_ISREG(status.st_mode):
                digest.update(path.read_bytes())
    return digest.hexdigest()


def test_debian_sandbox_writes_anywhere(built: Built) -> None:
    before = _tree_digest(built.root / "etc")
    script = (
        "echo changed > /etc/motd && echo new > /usr/bin/new-file && "
        "mkdir -p /var/lib/x && touch /var/lib/x/y && id -u && "
        "stat -c %u /usr/bin/python3 && python3 -c 'print(6*7)'"
    )
    code, stdout, stderr = asyncio.run(_run_in_debian(built.store.data_dir, script))
    assert code == 0, stderr
    assert stdout.split() == [b"0", b"0", b"42"]
    assert not (built.root / "usr/bin/new-file").exists()
    assert _tree_digest(built.root / "etc") == before


def test_debian_sandbox_starts_from_image(built: Built) -> None:
    """A second sandbox does not see the first one's writes."""
    script = "test ! -e /usr/bin/new-file && cat /etc/debian_version"
    code, stdout, stderr = asyncio.run(_run_in_debian(built.store.data_dir, script))
    assert code == 0, stderr
    assert stdout.strip().split(b".")[0].isdigit()


def test_debian_remove(built: Built) -> None:
    built.store.remove("debian")
    assert not os.path.lexists(built.root)
    assert "debian" not in [info.name for info in built.store.list()]
    leftovers = [
        name
        for name in os.listdir(built.store.images_dir)
        if name.startswith(".debian")
    ]
    assert leftovers == []


# -- failed and interrupted builds --------------------------------------------


def test_build_bogus_suite(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "data")
    with pytest.raises(InvalidArgument) as caught:
        store.build("debian", suite="bogus-suite")
    assert "unknown suite 'bogus-suite'" in str(caught.value)
    assert _build_dirs(store) == []
    assert not (store.images_dir / "debian").exists()


def test_build_unreachable_mirror(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "data")
    # A build directory left by a killed build is deleted by the next build.
    stale = store.images_dir / ".debian.build-stale"
    stale.mkdir(parents=True)
    (stale / "file").write_text("x")
    # Nothing listens on the discard port of loopback, so the download fails at once.
    with pytest.raises(Unavailable) as caught:
        store.build("debian", mirror="http://127.0.0.1:9/debian")
    assert "http://127.0.0.1:9/debian" in str(caught.value)
    assert "--mirror" in str(caught.value)
    assert _build_dirs(store) == []
    assert not (store.images_dir / "debian").exists()


def test_build_interrupted_while_unpacking(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "data")
    steps: list[str] = []

    def interrupt_at_unpacking(text: str) -> None:
        steps.append(text)
        if " Unpacking " in text:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.build("debian", progress=interrupt_at_unpacking)
    assert " Unpacking " in steps[-1]
    assert _build_dirs(store) == []
    assert not (store.images_dir / "debian").exists()
    assert _mount_points_under(tmp_path) == []
    assert _processes_mentioning(str(tmp_path)) == []
