"""Volumes backed by fsspec URLs, mounted through FUSE, in real sandboxes.

memory:// volumes keep their files in the FUSE server's memory; the s3://
tests use moto's S3 server on loopback. Each POSIX row of docs/volumes.md
has a test here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from benchmarks.s3server import ACCESS_KEY, REGION, SECRET_KEY, MotoServer
from engine import CloudBucketConfig, Sandbox, Volume
from engine.core.engine import FUSE_LIMITS
from engine.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from engine.sdk.secrets import SecretClient
from engine.sdk.volumes import VolumeClient

if TYPE_CHECKING:
    from conftest import CliRunner, Daemon

MOUNT = "/data"


def fuse_mounts(daemon: Daemon) -> list[str]:
    prefix = str(daemon.data_dir / "fuse" / "mnt") + "/"
    with open("/proc/self/mountinfo") as table:
        return [line.split()[4] for line in table if line.split()[4].startswith(prefix)]


@pytest.fixture
def volumes(daemon: Daemon) -> Iterator[VolumeClient]:
    with VolumeClient(daemon.address) as client:
        yield client


@pytest.fixture
def memory_volume(volumes: VolumeClient) -> Iterator[str]:
    name = f"mem-{uuid.uuid4().hex[:10]}"
    volumes.create(name, url=f"memory://{name}")
    try:
        yield name
    finally:
        volumes.delete(name)


def python(sandbox: Any, code: str) -> tuple[int, str, str]:
    process = sandbox.process.exec("python3", "-c", textwrap.dedent(code))
    status = process.wait(timeout=120)
    return status, process.stdout.read(), process.stderr.read()


def mounted(daemon: Daemon, name: str, read_only: bool = False) -> Any:
    return Sandbox(
        address=daemon.address, volumes=[Volume(name, MOUNT, read_only=read_only)]
    ).create()


# ---------------------------------------------------------------- service


def test_fsspec_volume_listed_with_url(
    volumes: VolumeClient, memory_volume: str
) -> None:
    listed = {info.name: info for info in volumes.list()}
    assert listed[memory_volume].url == f"memory://{memory_volume}"
    assert listed[memory_volume].size_bytes is None


def test_fsspec_volume_other_url_taken(
    volumes: VolumeClient, memory_volume: str
) -> None:
    with pytest.raises(AlreadyExists, match="memory://other"):
        volumes.create(memory_volume, url="memory://other")


@pytest.mark.parametrize(
    "url",
    ["gs://bucket", "s3://", "s3://Bad_Bucket/x", "s3://ok-bucket/../x", "memory://"],
)
def test_fsspec_volume_invalid_url(volumes: VolumeClient, url: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid"):
        volumes.create(f"bad-{uuid.uuid4().hex[:8]}", url=url)


def test_fsspec_volume_s3_settings_on_memory(volumes: VolumeClient) -> None:
    with pytest.raises(InvalidArgument, match="only to s3://"):
        volumes.create(
            f"bad-{uuid.uuid4().hex[:8]}",
            url="memory://x",
            s3=CloudBucketConfig(endpoint="http://127.0.0.1:1"),
        )


def test_fsspec_volume_missing_secret(volumes: VolumeClient) -> None:
    missing = f"MISSING_{uuid.uuid4().hex[:8].upper()}"
    name = f"bad-{uuid.uuid4().hex[:8]}"
    with pytest.raises(NotFound, match=missing):
        volumes.create(
            name,
            url="s3://some-bucket",
            s3=CloudBucketConfig(access_key=missing, secret_key=missing),
        )
    assert name not in [info.name for info in volumes.list()]


def test_fsspec_volume_path_rpcs_rejected(
    volumes: VolumeClient, memory_volume: str
) -> None:
    with pytest.raises(FailedPrecondition, match="only inside sandboxes"):
        volumes.list_path(memory_volume)
    with pytest.raises(FailedPrecondition, match="only inside sandboxes"):
        volumes.write_bytes(memory_volume, "x", b"x")


def test_fsspec_volume_delete_stops_server(
    daemon: Daemon, volumes: VolumeClient
) -> None:
    name = f"mem-{uuid.uuid4().hex[:10]}"
    volumes.create(name, url=f"memory://{name}")
    with mounted(daemon, name) as sb:
        assert python(sb, f"open('{MOUNT}/f', 'w').write('x')")[0] == 0
        assert any(point.endswith(f"volume-{name}") for point in fuse_mounts(daemon))
        with pytest.raises(FailedPrecondition, match="mounted by sandbox"):
            volumes.delete(name)
    volumes.delete(name)
    assert not any(point.endswith(f"volume-{name}") for point in fuse_mounts(daemon))
    assert not (daemon.data_dir / "fuse" / "mnt" / f"volume-{name}").exists()


def test_fsspec_server_in_bounded_cgroup(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        assert python(sb, f"open('{MOUNT}/f', 'w').write('x')")[0] == 0
        pid_file = daemon.data_dir / "fuse" / "pids" / f"volume-{memory_volume}"
        pid = int(pid_file.read_text().split()[0])
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        memory = [line.split(":", 2)[2] for line in lines if ":memory:" in line]
        limit_path = f"/sys/fs/cgroup/memory{memory[0]}/memory.limit_in_bytes"
        limit = int(Path(limit_path).read_text())
    assert memory[0].endswith("/fuse-servers")
    assert limit == FUSE_LIMITS.memory_bytes


# ---------------------------------------------------------------- sharing


def test_fsspec_volume_persists_across_sandboxes(
    daemon: Daemon, memory_volume: str
) -> None:
    with mounted(daemon, memory_volume) as sb:
        assert python(sb, f"open('{MOUNT}/kept', 'w').write('kept')")[0] == 0
    with mounted(daemon, memory_volume) as sb:
        assert python(sb, f"print(open('{MOUNT}/kept').read())")[1] == "kept\n"


def test_fsspec_volume_shared_by_two_sandboxes(
    daemon: Daemon, memory_volume: str
) -> None:
    with (
        mounted(daemon, memory_volume) as first,
        mounted(daemon, memory_volume, read_only=True) as second,
    ):
        assert python(first, f"open('{MOUNT}/from-first', 'w').write('1')")[0] == 0
        code, out, err = python(second, f"print(open('{MOUNT}/from-first').read())")
        assert code == 0, err
        assert out == "1\n"
        code, out, _ = python(
            second,
            f"""
            import errno
            try:
                open('{MOUNT}/from-second', 'w')
            except OSError as error:
                print(errno.errorcode[error.errno])
            """,
        )
        assert out == "EROFS\n"


def test_fsspec_volume_owned_by_sandbox_root(
    daemon: Daemon, memory_volume: str
) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            import os
            open('{MOUNT}/f', 'w').write('x')
            for path in ('{MOUNT}', '{MOUNT}/f'):
                status = os.stat(path)
                print(status.st_uid, status.st_gid, oct(status.st_mode & 0o777))
            """,
        )
    assert code == 0, err
    assert out.splitlines() == ["0 0 0o755", "0 0 0o644"]


# ------------------------------------------------------------ POSIX rows


def test_fsspec_rename(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            import errno, os
            open('{MOUNT}/a', 'w').write('a')
            os.rename('{MOUNT}/a', '{MOUNT}/b')
            print(os.listdir('{MOUNT}'), open('{MOUNT}/b').read())
            open('{MOUNT}/c', 'w').write('c')
            os.rename('{MOUNT}/c', '{MOUNT}/b')
            print(sorted(os.listdir('{MOUNT}')), open('{MOUNT}/b').read())
            os.makedirs('{MOUNT}/d/e')
            open('{MOUNT}/d/e/f', 'w').write('f')
            os.rename('{MOUNT}/d', '{MOUNT}/g')
            print(sorted(os.listdir('{MOUNT}')), open('{MOUNT}/g/e/f').read())
            try:
                os.rename('{MOUNT}/g', '{MOUNT}/g/e/inside')
            except OSError as error:
                print(errno.errorcode[error.errno])
            """,
        )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "['b'] a"
    assert lines[1] == "['b'] c"
    assert lines[2] == "['b', 'g'] f"
    assert lines[3] == "EINVAL"


def test_fsspec_chmod_and_chown(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            import errno, os
            open('{MOUNT}/f', 'w').write('x')
            for call in (lambda: os.chmod('{MOUNT}/f', 0o600),
                         lambda: os.chmod('{MOUNT}', 0o700),
                         lambda: os.chown('{MOUNT}/f', 1000, 1000),
                         lambda: os.chmod('{MOUNT}/f', 0o644),
                         lambda: os.chmod('{MOUNT}', 0o755),
                         lambda: os.chown('{MOUNT}/f', 0, 0)):
                try:
                    call()
                    print('ok')
                except OSError as error:
                    print(errno.errorcode[error.errno])
            print(oct(os.stat('{MOUNT}/f').st_mode & 0o777))
            """,
        )
    assert code == 0, err
    # The mode and owner a file already has are accepted; others are not.
    assert out.splitlines() == ["EPERM", "EPERM", "EPERM", "ok", "ok", "ok", "0o644"]


def test_fsspec_utimes(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            import errno, os, time
            open('{MOUNT}/f', 'w').write('x')
            before = os.stat('{MOUNT}/f').st_mtime
            time.sleep(1.1)
            os.utime('{MOUNT}/f')
            after = os.stat('{MOUNT}/f').st_mtime
            print(after > before, open('{MOUNT}/f').read())
            try:
                os.utime('{MOUNT}/f', (0, 0))
            except OSError as error:
                print(errno.errorcode[error.errno])
            """,
        )
    assert code == 0, err
    assert out.splitlines() == ["True x", "EPERM"]


def test_fsspec_fsync_publishes(daemon: Daemon, memory_volume: str) -> None:
    with (
        mounted(daemon, memory_volume) as writer,
        mounted(daemon, memory_volume) as reader,
    ):
        process = writer.process.exec(
            "python3",
            "-c",
            textwrap.dedent(
                f"""
                import os, time
                fd = os.open('{MOUNT}/synced', os.O_WRONLY | os.O_CREAT)
                os.write(fd, b'before close')
                os.fsync(fd)
                print('synced', flush=True)
                time.sleep(30)
                """
            ),
        )
        deadline = time.monotonic() + 30
        while "synced" not in process.stdout.read_available().decode():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # The kernel's attribute cache of the reader's mount lasts 1 s.
        time.sleep(1.5)
        code, out, err = python(reader, f"print(open('{MOUNT}/synced').read())")
        process.kill()
    assert code == 0, err
    assert out == "before close\n"


def test_fsspec_append(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            import os
            open('{MOUNT}/log', 'w').write('1')
            with open('{MOUNT}/log', 'a') as f:
                f.write('2')
            fd = os.open('{MOUNT}/log', os.O_WRONLY | os.O_APPEND)
            os.pwrite(fd, b'3', 0)
            os.close(fd)
            print(open('{MOUNT}/log').read())
            """,
        )
    assert code == 0, err
    # Like Linux for O_APPEND files, pwrite appends too.
    assert out == "123\n"


def test_fsspec_links_and_special_files(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            import errno, os
            open('{MOUNT}/f', 'w').write('x')
            for call in (lambda: os.symlink('f', '{MOUNT}/s'),
                         lambda: os.link('{MOUNT}/f', '{MOUNT}/h'),
                         lambda: os.mkfifo('{MOUNT}/p')):
                try:
                    call()
                    print('ok')
                except OSError as error:
                    print(errno.errorcode[error.errno])
            print(sorted(os.listdir('{MOUNT}')))
            """,
        )
    assert code == 0, err
    assert out.splitlines() == ["EPERM", "EPERM", "EPERM", "['f']"]


def test_fsspec_truncate(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            import os
            open('{MOUNT}/t', 'w').write('0123456789')
            os.truncate('{MOUNT}/t', 4)
            print(open('{MOUNT}/t').read())
            with open('{MOUNT}/t', 'r+') as f:
                f.truncate(2)
            print(open('{MOUNT}/t').read(), os.stat('{MOUNT}/t').st_size)
            """,
        )
    assert code == 0, err
    assert out.splitlines() == ["0123", "01 2"]


# --------------------------------------------------------------------- s3


def test_s3_volume_survives_daemon_restart(daemon_factory: Any) -> None:
    with MotoServer() as moto:
        bucket = f"vol-{uuid.uuid4().hex[:12]}"
        moto.client().create_bucket(Bucket=bucket)
        running = daemon_factory()
        with SecretClient(running.address) as secrets:
            secrets.create("VOLUME_ACCESS", ACCESS_KEY)
            secrets.create("VOLUME_SECRET", SECRET_KEY)
        settings = CloudBucketConfig(
            endpoint=moto.endpoint,
            region=REGION,
            access_key="VOLUME_ACCESS",
            secret_key="VOLUME_SECRET",
            force_path_style=True,
        )
        with VolumeClient(running.address) as volumes:
            volumes.create("shared", url=f"s3://{bucket}/volumes/shared", s3=settings)
        with mounted(running, "shared") as sb:
            assert python(sb, f"open('{MOUNT}/note', 'w').write('durable')")[0] == 0
        stored = moto.client().get_object(Bucket=bucket, Key="volumes/shared/note")
        assert stored["Body"].read() == b"durable"
        assert running.stop() == 0
        assert fuse_mounts(running) == []
        again = daemon_factory(data_dir=running.data_dir)
        with mounted(again, "shared") as sb:
            code, out, err = python(sb, f"print(open('{MOUNT}/note').read())")
        assert code == 0, err
        assert out == "durable\n"


# -------------------------------------------------------------------- CLI


def test_cli_volume_create_with_url(cli: CliRunner, volumes: VolumeClient) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    created = cli("volume", "create", name, "--url", f"memory://{name}")
    assert created.returncode == 0, created.stderr
    try:
        table = cli("volume", "ls")
        assert table.returncode == 0, table.stderr
        line = next(line for line in table.stdout.splitlines() if line.startswith(name))
        assert line.split()[-1] == f"memory://{name}"
        bad = cli("volume", "create", f"{name}-x", "--url", "ftp://x")
        assert bad.returncode == 1
        assert "invalid volume url 'ftp://x'" in bad.stderr
    finally:
        volumes.delete(name)


def test_local_volume_unchanged(daemon: Daemon, volumes: VolumeClient) -> None:
    name = f"local-{uuid.uuid4().hex[:8]}"
    info = volumes.create(name)
    try:
        assert info.url == ""
        volumes.write_bytes(name, "f", b"local")
        assert volumes.read_bytes(name, "f") == b"local"
        assert os.path.isdir(daemon.data_dir / "volumes" / name / "data")
    finally:
        volumes.delete(name)


def test_fsspec_rename_flags(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            import ctypes, errno, os
            libc = ctypes.CDLL(None, use_errno=True)
            AT_FDCWD = -100
            open('{MOUNT}/a', 'w').write('a')
            open('{MOUNT}/b', 'w').write('b')
            for flags in (1, 2):  # RENAME_NOREPLACE, RENAME_EXCHANGE
                result = libc.renameat2(
                    AT_FDCWD, b'{MOUNT}/a', AT_FDCWD, b'{MOUNT}/b', flags
                )
                print(errno.errorcode[ctypes.get_errno()] if result else 'ok')
            result = libc.renameat2(AT_FDCWD, b'{MOUNT}/a', AT_FDCWD, b'{MOUNT}/c', 1)
            print('ok' if result == 0 else errno.errorcode[ctypes.get_errno()])
            print(sorted(os.listdir('{MOUNT}')), open('{MOUNT}/b').read())
            """,
        )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "EEXIST"
    assert lines[1] == "EINVAL"
    assert lines[2] == "ok"
    assert lines[3] == "['b', 'c'] b"


def test_fsspec_concurrent_writers(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            first = open('{MOUNT}/shared', 'w')
            second = open('{MOUNT}/shared', 'w')
            first.write('first writer')
            second.write('second')
            first.close()
            print(open('{MOUNT}/shared').read())
            second.close()
            print(open('{MOUNT}/shared').read())
            """,
        )
    assert code == 0, err
    # Each close uploads that handle's whole copy, so the last close wins.
    # Meanwhile the mount shows the copy of the handle still open for
    # writing, which O_TRUNC emptied and Python has not flushed yet.
    assert out.splitlines() == ["", "second"]


def test_fsspec_huge_read_request(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            import hashlib, os
            data = os.urandom(6 * 1024 * 1024 + 1)
            open('{MOUNT}/big', 'wb').write(data)
            fd = os.open('{MOUNT}/big', os.O_RDONLY)
            received = b''
            while chunk := os.read(fd, 1 << 30):
                received += chunk
            os.close(fd)
            print(received == data, len(received))
            """,
        )
    assert code == 0, err
    assert out == f"True {6 * 1024 * 1024 + 1}\n"


def test_sweep_removes_stacked_binds() -> None:
    """Binds left by several crashed engines all go at the next start."""
    from engine.runtime import libc
    from engine.storage.fuse import FuseManager, mounted_paths

    with tempfile.TemporaryDirectory(dir="/tmp") as work:
        data_dir = Path(work)
        manager = FuseManager(data_dir, 100000)
        mnt = data_dir / "fuse" / "mnt"
        try:
            manager.prepare()
            # What prepare does, twice more, as two more crashed engines would.
            for _ in range(2):
                libc.mount(str(mnt), str(mnt), None, libc.MS_BIND)
            with open("/proc/self/mountinfo") as table:
                stacked = [line for line in table if line.split()[4] == str(mnt)]
            # Binds onto a shared mount propagate to its peers, so there are more.
            assert len(stacked) >= 3
            manager.sweep()
            assert str(mnt) not in mounted_paths()
        finally:
            for _ in range(5):
                with contextlib.suppress(OSError):
                    libc.umount2(str(mnt), libc.MNT_DETACH)


def test_fsspec_unlink_open_file(daemon: Daemon, memory_volume: str) -> None:
    with mounted(daemon, memory_volume) as sb:
        code, out, err = python(
            sb,
            f"""
            import errno, os
            fd = os.open('{MOUNT}/doomed', os.O_RDWR | os.O_CREAT)
            os.write(fd, b'before')
            os.unlink('{MOUNT}/doomed')
            print(sorted(os.listdir('{MOUNT}')))
            os.write(fd, b' after')
            print(os.pread(fd, 100, 0))
            try:
                os.fstat(fd)
            except OSError as error:
                print(errno.errorcode[error.errno])
            os.close(fd)
            print(sorted(os.listdir('{MOUNT}')), os.path.exists('{MOUNT}/doomed'))
            """,
        )
    assert code == 0, err
    lines = out.splitlines()
    # As on Linux: the name goes at once, the open file keeps working, and
    # the last close does not bring the file back. fstat fails, because
    # libfuse's high-level API has no path to pass for a deleted file.
    assert lines[0] == "[]"
    assert lines[1] == "b'before after'"
    assert lines[2] == "ESTALE"
    assert lines[3] == "[] False"


def test_fsspec_locks_are_local(daemon: Daemon, memory_volume: str) -> None:
    with (
        mounted(daemon, memory_volume) as first,
        mounted(daemon, memory_volume) as second,
    ):
        assert python(first, f"open('{MOUNT}/lock', 'w').close()")[0] == 0
        holder = first.process.exec(
            "python3",
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, time
                f = open('{MOUNT}/lock')
                fcntl.flock(f, fcntl.LOCK_EX)
                print('locked', flush=True)
                time.sleep(30)
                """
            ),
        )
        deadline = time.monotonic() + 30
        while "locked" not in holder.stdout.read_available().decode():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        code, out, err = python(
            second,
            f"""
            import errno, fcntl
            f = open('{MOUNT}/lock')
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                print('acquired')
            except OSError as error:
                print(errno.errorcode[error.errno])
            """,
        )
        holder.kill()
    assert code == 0, err
    # The kernel keeps the locks, so they hold between sandboxes of one host.
    assert out in ("EWOULDBLOCK\n", "EAGAIN\n")
