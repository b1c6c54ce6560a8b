"""S3 bucket mounts in real sandboxes, against moto's S3 server on loopback.

Each operation runs inside a sandbox through normal file calls, and each
result is checked both there and in the bucket itself through boto3.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from conftest import make_data_dir, remove_data_dir, start_daemon

from benchmarks.s3server import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, free_port
from engine import CloudBucket, CloudBucketConfig, Sandbox, SandboxState
from engine.errors import FailedPrecondition, InvalidArgument, NotFound
from engine.runtime import cgroups
from engine.sdk.secrets import SecretClient

if TYPE_CHECKING:
    from conftest import Daemon

MOUNT = "/bucket"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def keys(daemon: Daemon) -> Iterator[tuple[str, str]]:
    """Names of two secrets with moto's keys."""
    suffix = uuid.uuid4().hex[:8].upper()
    names = (f"S3_ACCESS_{suffix}", f"S3_SECRET_{suffix}")
    with SecretClient(daemon.address) as secrets:
        secrets.create(names[0], ACCESS_KEY)
        secrets.create(names[1], SECRET_KEY)
        try:
            yield names
        finally:
            for name in names:
                secrets.delete(name)


@pytest.fixture
def bucket(moto: MotoServer) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = moto.client()
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        listing = client.list_objects_v2(Bucket=name)
        for item in listing.get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
        client.delete_bucket(Bucket=name)


def config(
    moto: MotoServer, keys: tuple[str, str], **options: Any
) -> CloudBucketConfig:
    settings: dict[str, Any] = {
        "endpoint": moto.endpoint,
        "region": REGION,
        "access_key": keys[0],
        "secret_key": keys[1],
        "force_path_style": True,
    }
    settings.update(options)
    return CloudBucketConfig(**settings)


def objects(moto: MotoServer, bucket: str) -> dict[str, bytes]:
    client = moto.client()
    listing = client.list_objects_v2(Bucket=bucket)
    return {
        item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in listing.get("Contents", [])
    }


def python(sandbox: Any, code: str) -> tuple[int, str, str]:
    process = sandbox.process.exec("python3", "-c", textwrap.dedent(code))
    code_ = process.wait(timeout=120)
    return code_, process.stdout.read(), process.stderr.read()


@pytest.fixture
def mounted(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str], bucket: str
) -> Iterator[Any]:
    mount = CloudBucket(bucket, MOUNT, config=config(moto, keys))
    with Sandbox(address=daemon.address, cloud_buckets=[mount]).create() as sb:
        yield sb


def fuse_mounts(data_dir: Path) -> list[str]:
    prefix = str(data_dir / "fuse" / "mnt") + "/"
    with open("/proc/self/mountinfo") as table:
        return [line.split()[4] for line in table if line.split()[4].startswith(prefix)]


def fuse_servers(daemon: Daemon) -> list[int]:
    servers = []
    for process in daemon.descendants():
        # Zombies and processes that exited meanwhile have no command line.
        with contextlib.suppress(psutil.Error):
            if "engine.storage.fuse" in " ".join(process.cmdline()):
                servers.append(process.pid)
    return servers


def wait_fuse_released(daemon: Daemon, timeout: float = 10.0) -> None:
    """Wait until the daemon has no FUSE mount or server left.

    Terminate returns once the sandbox's processes are killed, and the
    daemon stops the sandbox's FUSE servers right after, in the background.
    """
    deadline = time.monotonic() + timeout
    while fuse_mounts(daemon.data_dir) or fuse_servers(daemon):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)


def running_process(pid: int) -> bool:
    """Return whether ``pid`` runs; a zombie that waits for its reaper does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------- operation matrix


def test_bucket_ls_and_read(moto: MotoServer, bucket: str, mounted: Any) -> None:
    client = moto.client()
    client.put_object(Bucket=bucket, Key="a.txt", Body=b"alpha")
    client.put_object(Bucket=bucket, Key="dir/b.txt", Body=b"beta")
    code, out, err = python(
        mounted,
        f"""
        import os
        print(sorted(os.listdir({MOUNT!r})))
        print(sorted(os.listdir({MOUNT!r} + "/dir")))
        print(open({MOUNT!r} + "/a.txt").read())
        print(open({MOUNT!r} + "/dir/b.txt").read())
        """,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "['a.txt', 'dir']"
    assert lines[1] == "['b.txt']"
    assert lines[2] == "alpha"
    assert lines[3] == "beta"


def test_bucket_write_new(moto: MotoServer, bucket: str, mounted: Any) -> None:
    code, _, err = python(
        mounted, f"open({MOUNT!r} + '/new.txt', 'w').write('written inside')"
    )
    assert code == 0, err
    assert objects(moto, bucket) == {"new.txt": b"written inside"}


def test_bucket_overwrite(moto: MotoServer, bucket: str, mounted: Any) -> None:
    moto.client().put_object(Bucket=bucket, Key="f", Body=b"old content here")
    code, _, err = python(mounted, f"open({MOUNT!r} + '/f', 'w').write('new')")
    assert code == 0, err
    assert objects(moto, bucket) == {"f": b"new"}


def test_bucket_append(moto: MotoServer, bucket: str, mounted: Any) -> None:
    moto.client().put_object(Bucket=bucket, Key="log", Body=b"one\n")
    code, _, err = python(
        mounted,
        f"""
        import os
        with open({MOUNT!r} + '/log', 'a') as f:
            f.write('two\\n')
        fd = os.open({MOUNT!r} + '/log', os.O_WRONLY | os.O_APPEND)
        os.write(fd, b'three\\n')
        os.close(fd)
        """,
    )
    assert code == 0, err
    assert objects(moto, bucket) == {"log": b"one\ntwo\nthree\n"}


def test_bucket_delete(moto: MotoServer, bucket: str, mounted: Any) -> None:
    moto.client().put_object(Bucket=bucket, Key="gone", Body=b"x")
    code, out, err = python(
        mounted,
        f"""
        import os
        os.unlink({MOUNT!r} + '/gone')
        print(os.path.exists({MOUNT!r} + '/gone'))
        """,
    )
    assert code == 0, err
    assert out == "False\n"
    assert objects(moto, bucket) == {}


def test_bucket_rename_file(moto: MotoServer, bucket: str, mounted: Any) -> None:
    moto.client().put_object(Bucket=bucket, Key="old", Body=b"payload")
    code, out, err = python(
        mounted,
        f"""
        import os
        os.rename({MOUNT!r} + '/old', {MOUNT!r} + '/new')
        print(sorted(os.listdir({MOUNT!r})))
        """,
    )
    assert code == 0, err
    assert out == "['new']\n"
    assert objects(moto, bucket) == {"new": b"payload"}


def test_bucket_rename_directory(moto: MotoServer, bucket: str, mounted: Any) -> None:
    client = moto.client()
    client.put_object(Bucket=bucket, Key="src/a", Body=b"1")
    client.put_object(Bucket=bucket, Key="src/sub/b", Body=b"2")
    code, out, err = python(
        mounted,
        f"""
        import os
        os.rename({MOUNT!r} + '/src', {MOUNT!r} + '/dst')
        print(sorted(os.listdir({MOUNT!r})))
        print(open({MOUNT!r} + '/dst/sub/b').read())
        """,
    )
    assert code == 0, err
    assert out == "['dst']\n2\n"
    stored = objects(moto, bucket)
    assert stored.get("dst/a") == b"1"
    assert stored.get("dst/sub/b") == b"2"
    assert not [key for key in stored if key.startswith("src")]


def test_bucket_rename_out_of_mount(mounted: Any) -> None:
    code, out, err = python(
        mounted,
        f"""
        import errno, os
        open({MOUNT!r} + '/stay', 'w').write('x')
        try:
            os.rename({MOUNT!r} + '/stay', '/tmp/escaped')
        except OSError as error:
            print(errno.errorcode[error.errno])
        """,
    )
    assert code == 0, err
    assert out == "EXDEV\n"


def test_bucket_mkdir_rmdir(moto: MotoServer, bucket: str, mounted: Any) -> None:
    code, out, err = python(
        mounted,
        f"""
        import errno, os
        os.mkdir({MOUNT!r} + '/d')
        print(os.path.isdir({MOUNT!r} + '/d'), sorted(os.listdir({MOUNT!r})))
        open({MOUNT!r} + '/d/f', 'w').write('x')
        try:
            os.rmdir({MOUNT!r} + '/d')
        except OSError as error:
            print(errno.errorcode[error.errno])
        os.unlink({MOUNT!r} + '/d/f')
        os.rmdir({MOUNT!r} + '/d')
        print(os.path.exists({MOUNT!r} + '/d'))
        try:
            os.mkdir({MOUNT!r})
        except OSError as error:
            print(errno.errorcode[error.errno])
        """,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "True ['d']"
    assert lines[1] == "ENOTEMPTY"
    assert lines[2] == "False"
    assert lines[3] == "EEXIST"
    assert objects(moto, bucket) == {}


def test_bucket_stat_sizes(moto: MotoServer, bucket: str, mounted: Any) -> None:
    client = moto.client()
    for size in (0, 1, 5 * 1024 * 1024 + 3):
        client.put_object(Bucket=bucket, Key=f"size-{size}", Body=b"z" * size)
    code, out, err = python(
        mounted,
        f"""
        import os, stat
        for size in (0, 1, 5 * 1024 * 1024 + 3):
            status = os.stat({MOUNT!r} + f'/size-{{size}}')
            print(status.st_size, stat.S_ISREG(status.st_mode), status.st_uid)
        with open({MOUNT!r} + '/growing', 'w') as f:
            f.write('abc')
            f.flush()
            print(os.fstat(f.fileno()).st_size)
        print(os.stat({MOUNT!r} + '/growing').st_size)
        print(stat.S_ISDIR(os.stat({MOUNT!r}).st_mode))
        """,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "0 True 0"
    assert lines[1] == "1 True 0"
    assert lines[2] == f"{5 * 1024 * 1024 + 3} True 0"
    assert lines[3] == "3"
    assert lines[4] == "3"
    assert lines[5] == "True"


def test_bucket_large_file_roundtrip(
    moto: MotoServer, bucket: str, mounted: Any
) -> None:
    code, out, err = python(
        mounted,
        f"""
        import hashlib, os
        data = os.urandom(40 * 1024 * 1024 + 7)
        with open({MOUNT!r} + '/big', 'wb') as f:
            f.write(data)
        print(hashlib.sha256(data).hexdigest())
        with open({MOUNT!r} + '/big', 'rb') as f:
            print(hashlib.sha256(f.read()).hexdigest())
        with open({MOUNT!r} + '/big', 'rb') as f:
            f.seek(30 * 1024 * 1024)
            print(f.read(5) == data[30 * 1024 * 1024:30 * 1024 * 1024 + 5])
        """,
    )
    assert code == 0, err
    written, read_back, seeked = out.splitlines()
    assert written == read_back
    assert seeked == "True"
    import hashlib

    assert hashlib.sha256(objects(moto, bucket)["big"]).hexdigest() == written


def test_bucket_unsupported_operations(mounted: Any) -> None:
    code, out, err = python(
        mounted,
        f"""
        import errno, os
        path = {MOUNT!r} + '/f'
        open(path, 'w').write('x')
        calls = {{
            'chmod': lambda: os.chmod(path, 0o600),
            'chown': lambda: os.chown(path, 1, 1),
            'utime': lambda: os.utime(path, (1, 1)),
            'symlink': lambda: os.symlink('f', {MOUNT!r} + '/l'),
            'link': lambda: os.link(path, {MOUNT!r} + '/h'),
            'mkfifo': lambda: os.mkfifo({MOUNT!r} + '/p'),
        }}
        for name, call in calls.items():
            try:
                call()
                print(name, 'ok')
            except OSError as error:
                print(name, errno.errorcode[error.errno])
        """,
    )
    assert code == 0, err
    results = dict(line.split() for line in out.splitlines())
    assert results == {
        "chmod": "EPERM",
        "chown": "EPERM",
        "utime": "EPERM",
        "symlink": "EPERM",
        "link": "EPERM",
        "mkfifo": "EPERM",
    }


def test_bucket_hostile_names(mounted: Any) -> None:
    code, out, err = python(
        mounted,
        f"""
        import errno, os
        root = {MOUNT!r}.encode()
        cases = {{
            'non-utf8': root + b'/bad\\xff',
            'long-name': root + b'/' + b'n' * 256,
            'long-key': root + b'/' + b'/'.join([b'd' * 200] * 6),
        }}
        for name, path in cases.items():
            try:
                open(path, 'w').close()
                print(name, 'ok')
            except OSError as error:
                print(name, errno.errorcode[error.errno])
        for name, path in {{
            'newline': root + b'/with\\nnewline',
            'tab': root + b'/with\\ttab',
        }}.items():
            try:
                open(path, 'w').close()
                print(name, 'ok')
            except OSError as error:
                print(name, errno.errorcode[error.errno])
        print('spaces', open(root + b'/a b  c', 'w').write('s'))
        """,
    )
    assert code == 0, err
    results = dict(line.split(" ", 1) for line in out.splitlines())
    assert results["non-utf8"] == "EILSEQ"
    assert results["long-name"] == "ENAMETOOLONG"
    assert results["long-key"] in ("ENAMETOOLONG", "ENOENT")
    assert results["newline"] == "EINVAL"
    assert results["tab"] == "EINVAL"
    assert results["spaces"] == "1"


def test_bucket_read_only(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str], bucket: str
) -> None:
    moto.client().put_object(Bucket=bucket, Key="keep", Body=b"kept")
    mount = CloudBucket(bucket, MOUNT, config=config(moto, keys, read_only=True))
    with Sandbox(address=daemon.address, cloud_buckets=[mount]).create() as sb:
        code, out, err = python(
            sb,
            f"""
            import errno, os
            print(open({MOUNT!r} + '/keep').read())
            calls = {{
                'create': lambda: open({MOUNT!r} + '/new', 'w'),
                'overwrite': lambda: open({MOUNT!r} + '/keep', 'w'),
                'unlink': lambda: os.unlink({MOUNT!r} + '/keep'),
                'mkdir': lambda: os.mkdir({MOUNT!r} + '/d'),
                'rename': lambda: os.rename({MOUNT!r} + '/keep', {MOUNT!r} + '/k2'),
            }}
            for name, call in calls.items():
                try:
                    call()
                    print(name, 'ok')
                except OSError as error:
                    print(name, errno.errorcode[error.errno])
            """,
        )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "kept"
    assert dict(line.split() for line in lines[1:]) == {
        "create": "EROFS",
        "overwrite": "EROFS",
        "unlink": "EROFS",
        "mkdir": "EROFS",
        "rename": "EROFS",
    }
    assert objects(moto, bucket) == {"keep": b"kept"}


def test_bucket_key_prefix_isolation(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str], bucket: str
) -> None:
    client = moto.client()
    client.put_object(Bucket=bucket, Key="outside.txt", Body=b"secret")
    client.put_object(Bucket=bucket, Key="team/inside.txt", Body=b"mine")
    client.put_object(Bucket=bucket, Key="teammate/other.txt", Body=b"theirs")
    mount = CloudBucket(bucket, MOUNT, config=config(moto, keys, key_prefix="team"))
    with Sandbox(address=daemon.address, cloud_buckets=[mount]).create() as sb:
        code, out, err = python(
            sb,
            f"""
            import os
            print(sorted(os.listdir({MOUNT!r})))
            print(os.path.exists({MOUNT!r} + '/../outside.txt'))
            print(os.path.exists({MOUNT!r} + '/../teammate/other.txt'))
            open({MOUNT!r} + '/written', 'w').write('w')
            """,
        )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "['inside.txt']"
    # ".." leaves the mount in the sandbox's own tree, not in the bucket.
    assert lines[1] == "False"
    assert lines[2] == "False"
    stored = objects(moto, bucket)
    assert stored["team/written"] == b"w"
    assert "written" not in stored


def test_bucket_shown_in_spec(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str], bucket: str
) -> None:
    mount = CloudBucket(bucket, MOUNT, config=config(moto, keys, key_prefix="p"))
    with Sandbox(address=daemon.address, cloud_buckets=[mount]).create() as sb:
        shown = sb.status().spec.cloud_buckets
    assert shown == (mount,)


def test_two_buckets_in_one_sandbox(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str], bucket: str
) -> None:
    other = f"test-{uuid.uuid4().hex[:12]}"
    client = moto.client()
    client.create_bucket(Bucket=other)
    client.put_object(Bucket=other, Key="o", Body=b"other")
    client.put_object(Bucket=bucket, Key="m", Body=b"main")
    mounts = [
        CloudBucket(bucket, "/b1", config=config(moto, keys)),
        CloudBucket(other, "/b1/nested", config=config(moto, keys)),
    ]
    try:
        with Sandbox(address=daemon.address, cloud_buckets=mounts).create() as sb:
            code, out, err = python(
                sb, "print(open('/b1/m').read(), open('/b1/nested/o').read())"
            )
        assert code == 0, err
        assert out == "main other\n"
    finally:
        client.delete_object(Bucket=other, Key="o")
        client.delete_bucket(Bucket=other)


# --------------------------------------------------------------- bad config


def live_sandboxes(daemon: Daemon) -> int:
    return len(Sandbox.list(address=daemon.address, state=SandboxState.RUNNING))


def assert_nothing_left(daemon: Daemon, before: int) -> None:
    # A sandbox that failed to start stays listed as TERMINATED with its
    # error, as for any start failure; none may stay RUNNING.
    assert live_sandboxes(daemon) == before
    wait_fuse_released(daemon)
    assert fuse_mounts(daemon.data_dir) == []
    assert fuse_servers(daemon) == []
    assert os.listdir(daemon.data_dir / "fuse" / "mnt") == []
    assert os.listdir(daemon.data_dir / "fuse" / "cache") == []


def test_bucket_missing_secret(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str], bucket: str
) -> None:
    before = live_sandboxes(daemon)
    missing = f"MISSING_{uuid.uuid4().hex[:8].upper()}"
    settings = CloudBucketConfig(
        endpoint=moto.endpoint, access_key=missing, secret_key=keys[1]
    )
    with pytest.raises(NotFound, match=missing):
        Sandbox(
            address=daemon.address, cloud_buckets=[CloudBucket(bucket, MOUNT, settings)]
        ).create()
    assert_nothing_left(daemon, before)


@pytest.mark.parametrize(
    "endpoint", ["ftp://127.0.0.1:1", "127.0.0.1:9000", "http://", "http://h:port"]
)
def test_bucket_bad_endpoint_url(
    daemon: Daemon, keys: tuple[str, str], endpoint: str
) -> None:
    before = live_sandboxes(daemon)
    settings = CloudBucketConfig(
        endpoint=endpoint, access_key=keys[0], secret_key=keys[1]
    )
    with pytest.raises(InvalidArgument, match="invalid endpoint"):
        Sandbox(
            address=daemon.address,
            cloud_buckets=[CloudBucket("some-bucket", MOUNT, settings)],
        ).create()
    assert_nothing_left(daemon, before)


def test_bucket_unreachable_endpoint(daemon: Daemon, keys: tuple[str, str]) -> None:
    before = live_sandboxes(daemon)
    # A loopback port that nothing listens on refuses the connection at once.
    endpoint = f"http://127.0.0.1:{free_port()}"
    settings = CloudBucketConfig(
        endpoint=endpoint,
        access_key=keys[0],
        secret_key=keys[1],
        force_path_style=True,
    )
    with pytest.raises(FailedPrecondition, match=f"cannot reach {endpoint}"):
        Sandbox(
            address=daemon.address,
            cloud_buckets=[CloudBucket("some-bucket", MOUNT, settings)],
        ).create()
    assert_nothing_left(daemon, before)


def test_bucket_missing_bucket(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str]
) -> None:
    before = live_sandboxes(daemon)
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(FailedPrecondition, match=f"bucket '{missing}' not found"):
        Sandbox(
            address=daemon.address,
            cloud_buckets=[CloudBucket(missing, MOUNT, config(moto, keys))],
        ).create()
    assert_nothing_left(daemon, before)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("Bad_Bucket", {}, "invalid bucket name"),
        ("ok-bucket", {"key_prefix": "../up"}, "invalid key_prefix"),
        ("ok-bucket", {"region": "US EAST"}, "invalid region"),
    ],
)
def test_bucket_invalid_config(
    daemon: Daemon,
    moto: MotoServer,
    keys: tuple[str, str],
    name: str,
    options: dict[str, str],
    message: str,
) -> None:
    settings = config(moto, keys, **options)
    with pytest.raises(InvalidArgument, match=message):
        Sandbox(
            address=daemon.address, cloud_buckets=[CloudBucket(name, MOUNT, settings)]
        ).create()


def test_bucket_only_one_key(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str]
) -> None:
    settings = CloudBucketConfig(endpoint=moto.endpoint, access_key=keys[0])
    with pytest.raises(InvalidArgument, match="only one of access_key and secret_key"):
        Sandbox(
            address=daemon.address,
            cloud_buckets=[CloudBucket("ok-bucket", MOUNT, settings)],
        ).create()


def test_bucket_mount_path_taken_by_volume(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str]
) -> None:
    from engine import Volume

    with pytest.raises(InvalidArgument, match="given twice"):
        Sandbox(
            address=daemon.address,
            volumes=[Volume("vol-for-path-check", MOUNT)],
            cloud_buckets=[CloudBucket("ok-bucket", MOUNT, config(moto, keys))],
        ).create()


# ----------------------------------------------------------------- cleanup


def test_bucket_terminate_removes_mount_and_server(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str], bucket: str
) -> None:
    mount = CloudBucket(bucket, MOUNT, config=config(moto, keys))
    sb = Sandbox(address=daemon.address, cloud_buckets=[mount]).create()
    try:
        assert len(fuse_mounts(daemon.data_dir)) == 1
        servers = fuse_servers(daemon)
        assert len(servers) == 1
        # Root only to mount; it serves sandbox requests as nobody.
        assert set(psutil.Process(servers[0]).uids()) == {65534}
        assert set(psutil.Process(servers[0]).gids()) == {65534}
    finally:
        sb.terminate()
        sb.close()
    wait_fuse_released(daemon)
    assert fuse_mounts(daemon.data_dir) == []
    assert fuse_servers(daemon) == []
    assert not running_process(servers[0])


def _host_process(daemon: Daemon, cmdline: list[str]) -> psutil.Process:
    """Return the one process below the daemon whose command line is ``cmdline``."""
    found = []
    for process in daemon.descendants():
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.cmdline() == cmdline:
                found.append(process)
    assert len(found) == 1, (cmdline, found)
    return found[0]


def _cgroup_dirs(pid: int) -> set[str]:
    """Return the directories of host process ``pid``'s cgroups, v1 and v2."""
    entries = cgroups.read_proc_cgroup(f"/proc/{pid}/cgroup")
    mounts = cgroups.read_cgroup_mounts("/proc/self/mountinfo")
    dirs = set(cgroups.own_v1_dirs(entries, mounts).values())
    unified = cgroups.own_v2_dir(entries, mounts)
    if unified is not None:
        dirs.add(unified)
    return dirs


def _sandbox_cgroup_dirs(daemon: Daemon, pid: int) -> list[str]:
    """Return the cgroup dirs of sandbox process ``pid`` that the daemon created.

    Those are the ones below the daemon's own cgroup. In a hierarchy where the
    engine makes no cgroups, the process shares the daemon's directory.
    """
    own = _cgroup_dirs(daemon.pid)
    return sorted(
        directory
        for directory in _cgroup_dirs(pid)
        if any(directory.startswith(parent + "/") for parent in own)
    )


def test_bucket_terminate_with_read_hanging(
    daemon: Daemon, moto: MotoServer, keys: tuple[str, str], bucket: str
) -> None:
    """A read stuck on a stalled endpoint does not keep the sandbox alive."""
    moto.client().put_object(Bucket=bucket, Key="slow", Body=b"s" * 1024)
    mount = CloudBucket(bucket, MOUNT, config=config(moto, keys))
    sb = Sandbox(address=daemon.address, cloud_buckets=[mount]).create()
    assert moto.process is not None
    stopped = False
    reader_dirs: list[str] = []
    host_reader = None
    try:
        # With moto stopped, the server's GET waits on the socket.
        os.kill(moto.process.pid, signal.SIGSTOP)
        stopped = True
        reader = sb.process.exec("cat", f"{MOUNT}/slow")
        time.sleep(1)
        assert reader.info().exit_code is None
        host_reader = _host_process(daemon, ["cat", f"{MOUNT}/slow"])
        reader_dirs = _sandbox_cgroup_dirs(daemon, host_reader.pid)
        assert reader_dirs
        started = time.monotonic()
        sb.terminate()
        elapsed = time.monotonic() - started
    finally:
        if stopped:
            os.kill(moto.process.pid, signal.SIGCONT)
        sb.close()
    # Terminate aborts the bucket's FUSE connection, which ends the read, so
    # the reader dies and the engine removes the sandbox's cgroup right after.
    assert elapsed < 30
    assert host_reader is not None
    with contextlib.suppress(psutil.NoSuchProcess):
        host_reader.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(os.path.exists(d) for d in reader_dirs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [d for d in reader_dirs if os.path.exists(d)] == []
    wait_fuse_released(daemon)
    assert fuse_mounts(daemon.data_dir) == []
    assert fuse_servers(daemon) == []


def test_bucket_mount_gone_after_daemon_kill(moto: MotoServer, bucket: str) -> None:
    data_dir = make_data_dir()
    first = start_daemon(data_dir)
    second = None
    try:
        with SecretClient(first.address) as secrets:
            secrets.create("ACCESS", ACCESS_KEY)
            secrets.create("SECRET", SECRET_KEY)
        settings = CloudBucketConfig(
            endpoint=moto.endpoint,
            access_key="ACCESS",
            secret_key="SECRET",
            force_path_style=True,
        )
        Sandbox(
            address=first.address,
            cloud_buckets=[CloudBucket(bucket, MOUNT, settings)],
        ).create()
        servers = fuse_servers(first)
        assert len(servers) == 1
        assert len(fuse_mounts(data_dir)) == 1
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        # The server sees its stdin close and exits; the next start sweeps
        # whatever is left.
        second = start_daemon(data_dir)
        assert fuse_mounts(data_dir) == []
        for pid in servers:
            assert not running_process(pid)
        assert os.listdir(data_dir / "fuse" / "mnt") == []
        assert second.stop() == 0
    finally:
        for running in (first, second):
            if running is not None and running.process.poll() is None:
                running.stop()
        remove_data_dir(first)


def test_bucket_nothing_left_after_daemon_stop(
    daemon_factory: Any, moto: MotoServer, bucket: str
) -> None:
    running = daemon_factory()
    with SecretClient(running.address) as secrets:
        secrets.create("ACCESS", ACCESS_KEY)
        secrets.create("SECRET", SECRET_KEY)
    settings = CloudBucketConfig(
        endpoint=moto.endpoint,
        access_key="ACCESS",
        secret_key="SECRET",
        force_path_style=True,
    )
    Sandbox(
        address=running.address, cloud_buckets=[CloudBucket(bucket, MOUNT, settings)]
    ).create()
    assert len(fuse_mounts(running.data_dir)) == 1
    assert running.stop() == 0
    assert fuse_mounts(running.data_dir) == []
    mounts = subprocess.run(
        ["grep", "-c", str(running.data_dir), "/proc/self/mountinfo"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert mounts.stdout.strip() == "0"


def test_bucket_through_file_api(moto: MotoServer, bucket: str, mounted: Any) -> None:
    mounted.fs.write_bytes(f"{MOUNT}/api.bin", b"\x00\x01 through sb.fs")
    assert mounted.fs.read_bytes(f"{MOUNT}/api.bin") == b"\x00\x01 through sb.fs"
    names = [info.name for info in mounted.fs.list_files(MOUNT)]
    assert names == ["api.bin"]
    # The file API writes a temporary file and renames it, which the bridge
    # turns into a copy and a delete: only the final object stays.
    assert objects(moto, bucket) == {"api.bin": b"\x00\x01 through sb.fs"}
