"""The FUSE bridge's operations called directly, over a memory:// backend.

No mount here: these tests call the Operations methods the way libfuse
would, to check name handling, read-only mounts and the read-ahead reader
at offsets and orders that the kernel may produce.
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from engine.errors import InvalidArgument
from engine.storage import fuse
from engine.storage.fuse import (
    Backend,
    MemoryBackend,
    MountConfig,
    Reader,
    S3Options,
    check_endpoint,
    check_key_prefix,
    make_bridge_class,
    parse_url,
)

UID = 100000


@pytest.fixture
def cache_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as path:
        yield path


def make_bridge(cache_dir: str, read_only: bool = False) -> Any:
    bridge_class, _ = make_bridge_class()
    config = MountConfig(
        url="memory://unit",
        mountpoint="/unused",
        cache_dir=cache_dir,
        uid=UID,
        gid=UID,
        read_only=read_only,
    )
    return bridge_class(MemoryBackend("/unit"), config)


def errno_of(call: Any) -> int:
    with pytest.raises(OSError) as raised:
        call()
    return raised.value.errno


# ------------------------------------------------------------------- names


def test_key_maps_below_root(cache_dir: str) -> None:
    bridge = make_bridge(cache_dir)
    assert bridge.key("/") == "/unit"
    assert bridge.key("/a/b") == "/unit/a/b"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/../escape", errno.EINVAL),
        ("/a/../../escape", errno.EINVAL),
        ("/a/./b", errno.EINVAL),
        ("/a//b", errno.EINVAL),
        ("/bad\udcff", errno.EILSEQ),
        ("/" + "n" * 256, errno.ENAMETOOLONG),
        ("/" + "/".join(["d" * 200] * 6), errno.ENAMETOOLONG),
        ("/new\nline", errno.EINVAL),
        ("/del\x7f", errno.EINVAL),
    ],
)
def test_key_rejects_hostile_names(cache_dir: str, path: str, expected: int) -> None:
    bridge = make_bridge(cache_dir)
    assert errno_of(lambda: bridge.key(path)) == expected


def test_attributes_owned_by_sandbox_root(cache_dir: str) -> None:
    bridge = make_bridge(cache_dir)
    handle = bridge.create("/f", 0o600)
    bridge.write("/f", b"abc", 0, handle)
    bridge.release("/f", handle)
    attributes = bridge.getattr("/f")
    assert attributes["st_uid"] == UID
    assert attributes["st_gid"] == UID
    assert attributes["st_mode"] & 0o777 == 0o644
    assert attributes["st_size"] == 3
    assert bridge.getattr("/")["st_mode"] & 0o777 == 0o755


# --------------------------------------------------------------- read-only


def test_read_only_rejects_writes(cache_dir: str) -> None:
    writable = make_bridge(cache_dir)
    handle = writable.create("/f", 0o644)
    writable.release("/f", handle)
    bridge = make_bridge(cache_dir, read_only=True)
    bridge.backend = writable.backend
    calls = {
        "create": lambda: bridge.create("/g", 0o644),
        "open for writing": lambda: bridge.open("/f", os.O_WRONLY),
        "mkdir": lambda: bridge.mkdir("/d", 0o755),
        "unlink": lambda: bridge.unlink("/f"),
        "rename": lambda: bridge.rename("/f", "/h"),
        "truncate": lambda: bridge.truncate("/f", 0),
        "utimens": lambda: bridge.utimens("/f"),
    }
    for name, call in calls.items():
        assert errno_of(call) == errno.EROFS, name


# -------------------------------------------------------------- operations


def test_rename_flags(cache_dir: str) -> None:
    bridge = make_bridge(cache_dir)
    for name in ("/a", "/b"):
        bridge.release(name, bridge.create(name, 0o644))
    assert errno_of(lambda: bridge.rename("/a", "/b", fuse.RENAME_NOREPLACE)) == (
        errno.EEXIST
    )
    assert errno_of(lambda: bridge.rename("/a", "/b", 2)) == errno.EINVAL
    bridge.rename("/a", "/c", fuse.RENAME_NOREPLACE)
    assert sorted(bridge.readdir("/", 0)) == [".", "..", "b", "c"]


def test_rename_directory_into_itself(cache_dir: str) -> None:
    bridge = make_bridge(cache_dir)
    bridge.mkdir("/d", 0o755)
    assert errno_of(lambda: bridge.rename("/d", "/d/inner")) == errno.EINVAL


def test_unsupported_operations(cache_dir: str) -> None:
    bridge = make_bridge(cache_dir)
    bridge.release("/f", bridge.create("/f", 0o644))
    assert errno_of(lambda: bridge.chmod("/f", 0o600)) == errno.EPERM
    assert errno_of(lambda: bridge.chown("/f", 0, 0)) == errno.EPERM
    assert bridge.chmod("/f", 0o100644) == 0
    assert bridge.chmod("/", 0o40755) == 0
    assert bridge.chown("/f", UID, -1) == 0
    assert errno_of(lambda: bridge.symlink("/l", "f")) == errno.EPERM
    assert errno_of(lambda: bridge.link("/h", "/f")) == errno.EPERM
    assert errno_of(lambda: bridge.mknod("/p", 0o10644, 0)) == errno.EPERM
    assert errno_of(lambda: bridge.utimens("/f", (0, 0))) == errno.EPERM


def test_write_beyond_max_size(cache_dir: str) -> None:
    bridge = make_bridge(cache_dir)
    handle = bridge.create("/f", 0o644)
    assert errno_of(lambda: bridge.write("/f", b"x", fuse.MAX_FILE_BYTES, handle)) == (
        errno.EFBIG
    )
    bridge.release("/f", handle)


def test_open_file_limit(cache_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fuse, "MAX_OPEN_FILES", 2)
    bridge = make_bridge(cache_dir)
    first = bridge.create("/a", 0o644)
    second = bridge.create("/b", 0o644)
    assert errno_of(lambda: bridge.create("/c", 0o644)) == errno.ENFILE
    bridge.release("/a", first)
    bridge.release("/b", second)


# ------------------------------------------------------------------ reader


class BytesBackend(Backend):
    """A backend with one object, streamed in small pieces."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        super().__init__(None, "/")
        self.data = data
        self.fail_after = fail_after
        self.streams = 0

    def stream(self, key: str, offset: int) -> Iterator[bytes]:
        self.streams += 1
        position = offset
        while position < len(self.data):
            if self.fail_after is not None and position >= self.fail_after:
                raise ConnectionError("connection reset")
            piece = self.data[position : position + 65536]
            position += len(piece)
            yield piece


def test_reader_sequential_uses_one_stream() -> None:
    data = os.urandom(8 * 1024 * 1024 + 5)
    backend = BytesBackend(data)
    reader = Reader(backend, "k", len(data))
    chunks = [reader.read(131072, offset) for offset in range(0, len(data), 131072)]
    reader.close()
    assert b"".join(chunks) == data
    assert backend.streams == 1


def test_reader_out_of_order_reads() -> None:
    data = os.urandom(12 * 1024 * 1024)
    backend = BytesBackend(data)
    reader = Reader(backend, "k", len(data))
    offsets = list(range(0, len(data), 131072))
    # The kernel's parallel readahead delivers neighbours out of order.
    shuffled = []
    for start in range(0, len(offsets), 8):
        window = offsets[start : start + 8]
        random.Random(start).shuffle(window)
        shuffled += window
    for offset in shuffled:
        assert reader.read(131072, offset) == data[offset : offset + 131072], offset
    reader.close()


def test_reader_seeks_and_end() -> None:
    data = os.urandom(3 * 1024 * 1024)
    reader = Reader(BytesBackend(data), "k", len(data))
    assert reader.read(100, 2 * 1024 * 1024) == data[2 * 1024 * 1024 :][:100]
    assert reader.read(100, 10) == data[10:110]
    assert reader.read(100, len(data) - 50) == data[-50:]
    assert reader.read(100, len(data)) == b""
    assert reader.read(0, 0) == b""
    reader.close()


def test_reader_backend_failure_is_eio() -> None:
    data = os.urandom(2 * 1024 * 1024)
    reader = Reader(BytesBackend(data, fail_after=1024 * 1024), "k", len(data))
    assert reader.read(4096, 0) == data[:4096]
    assert errno_of(lambda: reader.read(4096, 1024 * 1024 + 8192)) == errno.EIO
    reader.close()


# ----------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket", ("s3", "bucket")),
        ("s3://bucket/a/b/", ("s3", "bucket/a/b")),
        ("memory://name", ("memory", "/name")),
    ],
)
def test_parse_url(url: str, expected: tuple[str, str]) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["file:///etc", "s3://", "s3://b/../c", "s3://bucket//x", "s3://UP", "s3://b?x=1"],
)
def test_parse_url_invalid(url: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid"):
        parse_url(url)


@pytest.mark.parametrize(
    "endpoint", ["ftp://h", "h:1", "http://", "http://h:x", "http://h/?q", "http://h#f"]
)
def test_check_endpoint_invalid(endpoint: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid endpoint"):
        check_endpoint(endpoint)


def test_check_endpoint_valid() -> None:
    check_endpoint("http://127.0.0.1:9000")
    check_endpoint("https://s3.example.com")
    check_endpoint("")


def test_check_key_prefix() -> None:
    assert check_key_prefix("/team/data/") == "team/data"
    assert check_key_prefix("") == ""
    for bad in ("a/../b", "a//b", ".", "a\0b"):
        with pytest.raises(InvalidArgument, match="invalid key_prefix"):
            check_key_prefix(bad)


def test_config_json_roundtrip() -> None:
    config = MountConfig(
        url="s3://b/p",
        mountpoint="/m",
        cache_dir="/c",
        uid=1,
        gid=2,
        read_only=True,
        s3=S3Options("http://127.0.0.1:1", "r", "a", "s", True),
        fsname="f",
    )
    assert MountConfig.from_json(config.to_json()) == config


def test_mounted_paths_unescapes(monkeypatch: pytest.MonkeyPatch) -> None:
    table = (
        b"36 27 0:57 / /data\\040dir/fuse/mnt/v\\134x rw - fuse.engine f rw\n"
        b"37 27 0:58 / /\xc3\xa9t\\011\xc3\xa9 rw - fuse.engine f rw\n"
    )
    real_open = open

    def fake_open(path: str, *args: Any, **kwargs: Any) -> Any:
        if path == "/proc/self/mountinfo":
            import io

            return io.BytesIO(table)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert fuse.mounted_paths() == {
        "/data dir/fuse/mnt/v\\x": "0:57",
        "/ét\té": "0:58",
    }


def test_readdir_lists_shared_name_once(
    cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bridge = make_bridge(cache_dir)
    listing = [
        {"name": "/unit/dir", "type": "file", "size": 3},
        {"name": "/unit/dir/", "type": "directory", "size": 0},
        {"name": "/unit/other", "type": "file", "size": 1},
    ]
    monkeypatch.setattr(bridge.backend, "listdir", lambda key: listing)
    assert bridge.readdir("/", 0) == [".", "..", "dir", "other"]
