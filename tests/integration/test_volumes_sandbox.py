"""Volumes mounted in sandboxes through the Engine: sharing, persistence, checks."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from engine.core.models import SandboxState, VolumeMount
from engine.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

if TYPE_CHECKING:
    from conftest import EngineRunner

# Prints the errno name of a failed write, or "ok".
WRITE_PROBE = """
import errno, sys
try:
    with open(sys.argv[1], "w") as file:
        file.write("x")
except OSError as error:
    print(errno.errorcode[error.errno])
else:
    print("ok")
"""


@pytest.fixture
def volume(engine: EngineRunner) -> Iterator[str]:
    """A fresh volume name on the shared engine.

    At teardown, every volume whose name starts with it is deleted, after its
    sandboxes are terminated.
    """
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    for info in engine.call(engine.engine.list_volumes()):
        if info.name.startswith(name):
            for sandbox_id in info.sandbox_ids:
                engine.terminate(sandbox_id)
            with contextlib.suppress(NotFound):
                engine.call(engine.engine.delete_volume(info.name))


def sh(engine: EngineRunner, sandbox_id: str, script: str) -> str:
    result = engine.run(sandbox_id, ["sh", "-c", script])
    assert result.exit_code == 0, result.stderr.decode(errors="replace")
    return result.text


def probe_write(engine: EngineRunner, sandbox_id: str, path: str) -> str:
    return engine.run(sandbox_id, ["python3", "-c", WRITE_PROBE, path]).text.strip()


def mounted(name: str, path: str, read_only: bool = False) -> tuple[VolumeMount, ...]:
    return (VolumeMount(name, path, read_only),)


def test_volume_shared_by_running_sandboxes(
    engine: EngineRunner, new_sandbox: Callable[..., str], volume: str
) -> None:
    first = new_sandbox(volumes=mounted(volume, "/root/data"))
    second = new_sandbox(volumes=mounted(volume, "/srv/shared"))
    sh(engine, first, "echo from-first > /root/data/a")
    assert sh(engine, second, "cat /srv/shared/a") == "from-first\n"
    sh(engine, second, "echo from-second >> /srv/shared/a")
    assert sh(engine, first, "cat /root/data/a") == "from-first\nfrom-second\n"


def test_volume_outlives_sandbox(
    engine: EngineRunner, new_sandbox: Callable[..., str], volume: str
) -> None:
    writer = new_sandbox(volumes=mounted(volume, "/root/data"))
    sh(engine, writer, "mkdir -p /root/data/dir && echo v1 > /root/data/dir/f")
    engine.terminate(writer)
    assert engine.state(writer) == SandboxState.TERMINATED

    reader = new_sandbox(volumes=mounted(volume, "/root/data"))
    assert sh(engine, reader, "cat /root/data/dir/f") == "v1\n"
    assert sh(engine, reader, "stat -c %u:%g /root/data/dir/f") == "0:0\n"
    # The next sandbox may change what the previous one wrote.
    sh(engine, reader, "echo v2 > /root/data/dir/f && rm -r /root/data/dir")
    sh(engine, reader, "echo new > /root/data/g && chmod 600 /root/data/g")
    assert sh(engine, reader, "cat /root/data/g") == "new\n"


def test_volume_read_only_erofs(
    engine: EngineRunner, new_sandbox: Callable[..., str], volume: str
) -> None:
    writer = new_sandbox(volumes=mounted(volume, "/root/data"))
    sh(engine, writer, "echo content > /root/data/existing")
    reader = new_sandbox(volumes=mounted(volume, "/root/data", read_only=True))
    assert sh(engine, reader, "cat /root/data/existing") == "content\n"
    assert probe_write(engine, reader, "/root/data/new") == "EROFS"
    assert probe_write(engine, reader, "/root/data/existing") == "EROFS"
    failed = engine.run(reader, ["rm", "/root/data/existing"])
    assert failed.exit_code != 0
    assert b"Read-only file system" in failed.stderr
    failed = engine.run(reader, ["mkdir", "/root/data/dir"])
    assert b"Read-only file system" in failed.stderr
    remount = engine.run(reader, ["mount", "-o", "remount,rw", "/root/data"])
    assert remount.exit_code != 0
    assert probe_write(engine, reader, "/root/data/new") == "EROFS"
    # The read-write mount of the other sandbox is unaffected.
    assert probe_write(engine, writer, "/root/data/new") == "ok"


def test_volume_mount_creates_parents(
    engine: EngineRunner, new_sandbox: Callable[..., str], volume: str
) -> None:
    sandbox = new_sandbox(volumes=mounted(volume, "/mnt/a/b/c"))
    sh(engine, sandbox, "echo deep > /mnt/a/b/c/f")
    assert sh(engine, sandbox, "cat /mnt/a/b/c/f") == "deep\n"
    assert (engine.engine.volumes.data_path(volume) / "f").read_text() == "deep\n"


def test_volume_nested_mounts(
    engine: EngineRunner, new_sandbox: Callable[..., str], volume: str
) -> None:
    inner = f"{volume}-inner"
    # Given child first: the engine mounts the parent first anyway.
    mounts = (VolumeMount(inner, "/data/inner"), VolumeMount(volume, "/data"))
    sandbox = new_sandbox(volumes=mounts)
    sh(engine, sandbox, "echo i > /data/inner/f && echo o > /data/f")
    engine.terminate(sandbox)
    inner_root = engine.engine.volumes.data_path(inner)
    outer_root = engine.engine.volumes.data_path(volume)
    assert (inner_root / "f").read_text() == "i\n"
    assert (outer_root / "f").read_text() == "o\n"
    assert (outer_root / "inner").is_dir()


def test_volume_created_on_first_use(
    engine: EngineRunner, new_sandbox: Callable[..., str], volume: str
) -> None:
    with pytest.raises(NotFound):
        engine.engine.volumes.get(volume)
    new_sandbox(volumes=mounted(volume, "/root/data"))
    assert engine.engine.volumes.get(volume).name == volume


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("data", "must be an absolute path"),
        ("/", "is the sandbox's root"),
        ("/proc", "inside /proc"),
        ("/proc/self", "inside /proc"),
        ("/dev", "inside /dev"),
        ("/dev/shm/x", "inside /dev"),
        ("/sys", "inside /sys"),
        ("/sys/fs/cgroup", "inside /sys"),
        ("/data/", "not in normal form; use '/data'"),
        ("/data/../proc", "not in normal form; use '/proc'"),
        ("//data", "not in normal form; use '/data'"),
        ("/a/./b", "not in normal form; use '/a/b'"),
        ("/da\0ta", "NUL"),
    ],
)
def test_mount_path_invalid(
    engine: EngineRunner, volume: str, path: str, message: str
) -> None:
    before = len(engine.call(engine.engine.list_sandboxes()))
    with pytest.raises(InvalidArgument) as raised:
        engine.create(volumes=mounted(volume, path))
    assert message in str(raised.value)
    assert repr(path) in str(raised.value)
    assert len(engine.call(engine.engine.list_sandboxes())) == before
    with pytest.raises(NotFound):
        engine.engine.volumes.get(volume)


def test_mount_path_twice(engine: EngineRunner, volume: str) -> None:
    mounts = (VolumeMount(volume, "/data"), VolumeMount(f"{volume}-b", "/data"))
    with pytest.raises(InvalidArgument, match="'/data' is given twice"):
        engine.create(volumes=mounts)


@pytest.mark.parametrize("name", ["", "Upper", "-dash", "a/b", ".hidden", "x" * 64])
def test_volume_name_invalid(engine: EngineRunner, name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid volume name"):
        engine.create(volumes=mounted(name, "/data"))


def test_delete_mounted_volume(
    engine: EngineRunner, new_sandbox: Callable[..., str], volume: str
) -> None:
    first = new_sandbox(volumes=mounted(volume, "/root/data"))
    second = new_sandbox(volumes=mounted(volume, "/root/data", read_only=True))
    sh(engine, first, "echo keep > /root/data/f")
    with pytest.raises(FailedPrecondition) as raised:
        engine.call(engine.engine.delete_volume(volume))
    assert first in str(raised.value)
    assert second in str(raised.value)
    assert sh(engine, second, "cat /root/data/f") == "keep\n"

    engine.terminate(first)
    with pytest.raises(FailedPrecondition, match=second):
        engine.call(engine.engine.delete_volume(volume))
    engine.terminate(second)
    engine.call(engine.engine.delete_volume(volume))
    with pytest.raises(NotFound):
        engine.engine.volumes.get(volume)
    assert not (engine.engine.volumes.directory / volume).exists()

    # The same name later is a new, empty volume.
    again = new_sandbox(volumes=mounted(volume, "/root/data"))
    assert sh(engine, again, "ls -A /root/data") == ""


def test_volume_users_listed(
    engine: EngineRunner, new_sandbox: Callable[..., str], volume: str
) -> None:
    first = new_sandbox(volumes=mounted(volume, "/root/data"))
    second = new_sandbox(volumes=mounted(volume, "/root/data"))
    sh(engine, first, "head -c 1000 /dev/zero > /root/data/f")
    listed = {info.name: info for info in engine.call(engine.engine.list_volumes())}
    assert listed[volume].sandbox_ids == tuple(sorted([first, second]))
    assert listed[volume].size_bytes == 1000
    assert listed[volume].file_count == 1
    engine.terminate(first)
    listed = {info.name: info for info in engine.call(engine.engine.list_volumes())}
    assert listed[volume].sandbox_ids == (second,)


def test_failed_start_releases_volume(engine: EngineRunner, volume: str) -> None:
    # /usr is a read-only bind of the host's /usr, so the mount point cannot
    # be created and the sandbox fails to start.
    with pytest.raises(Unavailable, match="failed to start"):
        engine.create(volumes=mounted(volume, "/usr/engine-volume-test"))
    listed = {info.name: info for info in engine.call(engine.engine.list_volumes())}
    assert listed[volume].sandbox_ids == ()
    engine.call(engine.engine.delete_volume(volume))


def test_volumes_in_stored_spec(
    engine_factory: Callable[..., EngineRunner],
) -> None:
    first = engine_factory()
    mounts = (VolumeMount("kept", "/root/data"), VolumeMount("ro", "/ro", True))
    sandbox_id = first.create(volumes=mounts)
    sh(first, sandbox_id, "echo persisted > /root/data/f")
    first.close()
    first.stop_loop()

    second = engine_factory(first.data_dir)
    info = second.call(second.engine.get_sandbox(sandbox_id))
    assert info.spec.volumes == mounts
    reader = second.create(volumes=mounts[:1])
    assert sh(second, reader, "cat /root/data/f") == "persisted\n"
    second.terminate(reader)


# Checks POSIX operations on a volume and prints "ok" when all behave.
POSIX_PROBE = """
import os, sys
root = sys.argv[1]
path = os.path.join(root, "file")
with open(path, "w") as file:
    file.write("one\\n")
    file.flush()
    os.fsync(file.fileno())
with open(path, "a") as file:
    file.write("two\\n")
assert open(path).read() == "one\\ntwo\\n"
os.chmod(path, 0o640)
assert os.stat(path).st_mode & 0o777 == 0o640
os.utime(path, (1_000_000_000, 1_000_000_000))
assert os.stat(path).st_mtime == 1_000_000_000
os.rename(path, os.path.join(root, "renamed"))
assert not os.path.exists(path)
os.link(os.path.join(root, "renamed"), os.path.join(root, "hardlink"))
assert os.stat(os.path.join(root, "hardlink")).st_nlink == 2
os.symlink("renamed", os.path.join(root, "symlink"))
assert open(os.path.join(root, "symlink")).read() == "one\\ntwo\\n"
directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
os.fsync(directory)
os.close(directory)
print("ok")
"""


def test_volume_posix_semantics(
    engine: EngineRunner, new_sandbox: Callable[..., str], volume: str
) -> None:
    sandbox = new_sandbox(volumes=mounted(volume, "/root/data"))
    result = engine.run(sandbox, ["python3", "-c", POSIX_PROBE, "/root/data"])
    assert result.stderr == b""
    assert result.text == "ok\n"
    host = engine.engine.volumes.data_path(volume)
    assert (host / "renamed").read_text() == "one\ntwo\n"
    assert (host / "renamed").stat().st_mtime == 1_000_000_000
    assert (host / "renamed").stat().st_mode & 0o777 == 0o640
    assert (host / "renamed").stat().st_uid == engine.engine.config.uid_base
    assert (host / "hardlink").samefile(host / "renamed")
