"""FUSE mounts of fsspec file systems: fsspec volumes and S3 bucket mounts.

Two halves live here, because they share one configuration format:

- The **server**, ``python -m engine.storage.fuse``, a separate process per
  mount. It reads one JSON line of configuration from stdin and builds the
  fsspec file system (``s3fs`` for ``s3://``, ``memory://`` for tests). It
  checks that the bucket exists, mounts itself with libfuse3 (through
  mfusepy) on the host under ``DATA_DIR/fuse/mnt/``, drops root, and writes
  one JSON line to stdout: ``{"ok": true}`` or ``{"ok": false, "error":
  ...}``. It serves
  until SIGTERM, or until stdin reaches end of file, which means that the
  daemon is gone.
- The **manager** (``FuseManager``), used by the Engine: it starts servers,
  stops them with SIGTERM, then SIGKILL, a write to the connection's
  ``abort`` file and a lazy unmount, and sweeps what a crashed daemon left.

The mount's files belong to ``uid``/``gid`` (the sandbox's root on the host)
with modes 0644 and 0755, and the kernel checks permissions against them
(``default_permissions``). ``allow_other`` lets the sandbox's processes, which
are not the mounting user, in. Sandboxes reach the mount through a bind mount
that their supervisor makes, as for local volumes, which works because the
daemon makes ``fuse/mnt`` a shared mount before any supervisor is forked.

``Bridge.key`` turns every path the kernel sends into a key below the mount's
root (``bucket/prefix``). It rejects "." and ".." components, names that are
not UTF-8 and names longer than the backend allows, so no request can name a
key outside the root.

Caching: reads stream the object from the requested offset in a background
thread and keep up to ``READ_AHEAD_BYTES`` ahead of the reader, so a
sequential read costs one request per file. Writes go to a temporary file in
the mount's cache directory and are uploaded on flush (every ``close``) and
fsync, so other clients of the backend see a file once it is closed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import FailedPrecondition, InvalidArgument, Unavailable
from engine.runtime import protocol
from engine.runtime.cgroups import Cgroup, write_control

log = logging.getLogger(__name__)

# Bytes a reader may fetch ahead of the offset it last read.
READ_AHEAD_BYTES = 32 * 1024 * 1024
# Bytes a reader keeps behind the offset it last read.
READ_BEHIND_BYTES = 4 * 1024 * 1024
# Bytes one backend request of a fallback (non-streaming) reader fetches.
READ_BLOCK_BYTES = 8 * 1024 * 1024
# Largest file a mount accepts, because writes are buffered on the host disk.
MAX_FILE_BYTES = 64 * 1024**3
# Files one server keeps open at once; past it open fails with ENFILE.
MAX_OPEN_FILES = 1024
# S3 limits keys to 1024 bytes of UTF-8; one name to NAME_MAX like Linux.
MAX_KEY_BYTES = 1024
MAX_NAME_BYTES = 255
# Seconds for which getattr returns a listing's entries without a backend request.
INFO_CACHE_SECONDS = 2.0
# Entries a directory rename moves at most.
MAX_RENAME_ENTRIES = 10_000
# Seconds the manager waits for a server to mount, and for it to exit.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Binds of fuse/mnt that the start sweep removes at most.
MAX_STACKED_BINDS = 64
FILE_MODE = 0o644
DIRECTORY_MODE = 0o755
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
# Uid and gid (nobody) the servers switch to once mounted, so that a bug
# reachable from sandbox requests runs without root.
SERVER_UID = 65534
# Linux renameat2 flags.
RENAME_NOREPLACE = 1


class ServerError(Exception):
    """A configuration error that the server reports before it mounts."""


# ------------------------------------------------------------- configuration


@dataclass(frozen=True)
class S3Options:
    """Connection settings of an S3-compatible endpoint, with resolved keys."""

    endpoint: str = ""
    region: str = ""
    access_key: str = ""
    secret_key: str = ""
    force_path_style: bool = False


def check_endpoint(endpoint: str) -> None:
    """Raise InvalidArgument unless ``endpoint`` is an http(s) URL with a host."""
    if not endpoint:
        return
    parsed = urllib.parse.urlsplit(endpoint)
    valid = parsed.scheme in ("http", "https") and bool(parsed.hostname)
    if valid:
        try:
            parsed.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            valid = False
    if not valid or parsed.query or parsed.fragment:
        raise InvalidArgument(
            f"invalid endpoint {endpoint!r}: expected an http:// or https:// URL"
            " with a host, such as http://127.0.0.1:9000"
        )


def parse_url(url: str) -> tuple[str, str]:
    """Split a volume URL into its protocol ("s3" or "memory") and root path.

    The root is "bucket" or "bucket/prefix" for s3 and "/name" for memory.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("s3", "memory"):
        raise InvalidArgument(
            f"invalid volume url {url!r}: expected s3://BUCKET[/PREFIX] or"
            " memory://NAME"
        )
    if parsed.query or parsed.fragment:
        raise InvalidArgument(f"invalid volume url {url!r}: remove the ? or # part")
    path = (parsed.netloc + parsed.path).strip("/")
    parts = path.split("/") if path else []
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise InvalidArgument(
            f"invalid volume url {url!r}: the bucket and prefix must be names"
            " separated by single '/', without '.' or '..'"
        )
    if parsed.scheme == "s3":
        check_bucket(parts[0])
        return "s3", "/".join(parts)
    return "memory", "/" + "/".join(parts)


def check_bucket(bucket: str) -> None:
    valid = 3 <= len(bucket) <= 63 and all(
        c.islower() or c.isdigit() or c in ".-" for c in bucket
    )
    if not valid or not bucket[0].isalnum() or not bucket[-1].isalnum():
        raise InvalidArgument(
            f"invalid bucket name {bucket!r}: use 3 to 63 lowercase letters,"
            " digits, '.' or '-', starting and ending with a letter or digit"
        )


def check_key_prefix(prefix: str) -> str:
    """Return a key prefix without leading or trailing "/", or raise InvalidArgument."""
    stripped = prefix.strip("/")
    parts = stripped.split("/") if stripped else []
    if any(part in ("", ".", "..") for part in parts) or "\0" in prefix:
        raise InvalidArgument(
            f"invalid key_prefix {prefix!r}: use names separated by single '/',"
            " without '.', '..' or NUL bytes, such as 'team/data'"
        )
    if len(stripped.encode()) > MAX_KEY_BYTES // 2:
        raise InvalidArgument(
            f"invalid key_prefix: {len(stripped.encode())} bytes, the maximum is"
            f" {MAX_KEY_BYTES // 2}"
        )
    return stripped


@dataclass(frozen=True)
class MountConfig:
    """Everything a server needs; sent to it as JSON on its stdin."""

    url: str
    mountpoint: str
    cache_dir: str
    uid: int
    gid: int
    read_only: bool = False
    s3: S3Options = field(default_factory=S3Options)
    fsname: str = "engine"
    # Host uid and gid the server switches to once it has mounted.
    server_uid: int = SERVER_UID

    def to_json(self) -> str:
        data = {
            "url": self.url,
            "mountpoint": self.mountpoint,
            "cache_dir": self.cache_dir,
            "uid": self.uid,
            "gid": self.gid,
            "read_only": self.read_only,
            "s3": self.s3.__dict__,
            "fsname": self.fsname,
            "server_uid": self.server_uid,
        }
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> MountConfig:
        data = json.loads(text)
        data["s3"] = S3Options(**data.get("s3", {}))
        return cls(**data)


# ------------------------------------------------------------------ backends


class Backend:
    """The fsspec calls the bridge needs, on keys below the mount's root."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root

    def info(self, key: str) -> dict[str, Any]:
        return self.fs.info(key)

    def listdir(self, key: str) -> list[dict[str, Any]]:
        entries = self.fs.ls(key, detail=True)
        result = []
        for entry in entries:
            name = entry["name"].rstrip("/")
            # s3fs lists a directory's own marker object "dir/" among its
            # children, and memory:// may list the directory itself.
            if entry["name"].endswith("/") or name == key.rstrip("/"):
                continue
            result.append(entry)
        return result

    def stream(self, key: str, offset: int) -> Iterator[bytes]:
        """Yield the object's bytes from ``offset`` to its end."""
        position = offset
        while True:
            data = self.fs.cat_file(
                key, start=position, end=position + READ_BLOCK_BYTES
            )
            if not data:
                return
            position += len(data)
            yield data
            if len(data) < READ_BLOCK_BYTES:
                return

    def upload(self, local_path: str, key: str) -> None:
        self.fs.put_file(local_path, key)

    def download(self, key: str, local_path: str) -> None:
        self.fs.get_file(key, local_path)

    def write_empty(self, key: str) -> None:
        self.fs.pipe_file(key, b"")

    def remove_file(self, key: str) -> None:
        self.fs.rm_file(key)

    def copy_file(self, source: str, destination: str) -> None:
        self.fs.cp_file(source, destination)

    def make_directory(self, key: str) -> None:
        self.fs.mkdir(key, create_parents=False)

    def remove_directory(self, key: str) -> None:
        self.fs.rmdir(key)

    def invalidate(self, key: str) -> None:
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache(key)


class MemoryBackend(Backend):
    """memory://: one process's dict, for tests; lost when the server exits."""

    def __init__(self, root: str) -> None:
        from fsspec.implementations.memory import MemoryFileSystem

        # MemoryFileSystem keeps its files in class attributes; a fresh
        # subclass keeps this server's files apart from any other instance.
        fs = type(
            "IsolatedMemoryFileSystem",
            (MemoryFileSystem,),
            {"store": {}, "pseudo_dirs": [""]},
        )(skip_instance_cache=True)
        fs.makedirs(root, exist_ok=True)
        super().__init__(fs, root)


class S3Backend(Backend):
    """s3:// through s3fs. Directories are zero-byte marker objects "dir/"."""

    def __init__(self, root: str, options: S3Options) -> None:
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if options.endpoint:
            client_kwargs["endpoint_url"] = options.endpoint
        if options.region:
            client_kwargs["region_name"] = options.region
        config_kwargs: dict[str, Any] = {
            "connect_timeout": 5,
            "read_timeout": 60,
            "retries": {"max_attempts": 2, "mode": "standard"},
        }
        if options.force_path_style:
            config_kwargs["s3"] = {"addressing_style": "path"}
        credentials: dict[str, Any] = {}
        if options.access_key or options.secret_key:
            credentials = {"key": options.access_key, "secret": options.secret_key}
        else:
            credentials = {"anon": True}
        fs = s3fs.S3FileSystem(
            **credentials,
            client_kwargs=client_kwargs,
            config_kwargs=config_kwargs,
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        super().__init__(fs, root)
        self.bucket = root.split("/", 1)[0]
        self.endpoint = options.endpoint or "the default AWS endpoint"

    def check(self) -> None:
        """Raise ServerError unless the bucket exists and the keys are accepted."""
        import fsspec.asyn

        try:
            fsspec.asyn.sync(
                self.fs.loop, self.fs._call_s3, "head_bucket", Bucket=self.bucket
            )
        except FileNotFoundError:
            raise ServerError(
                f"bucket {self.bucket!r} not found at {self.endpoint}; create it or"
                " check the name"
            ) from None
        except PermissionError:
            raise ServerError(
                f"access to bucket {self.bucket!r} at {self.endpoint} was denied;"
                " check the access_key and secret_key secrets"
            ) from None
        except Exception as error:
            raise ServerError(
                f"cannot reach {self.endpoint} for bucket {self.bucket!r}:"
                f" {type(error).__name__}: {_short(str(error))}"
            ) from None

    def stream(self, key: str, offset: int) -> Iterator[bytes]:
        """Yield the object from ``offset`` through one streaming GET."""
        import fsspec.asyn

        bucket, _, name = key.partition("/")
        loop = self.fs.loop

        async def open_body() -> Any:
            response = await self.fs._call_s3(
                "get_object", Bucket=bucket, Key=name, Range=f"bytes={offset}-"
            )
            return response["Body"]

        try:
            body = fsspec.asyn.sync(loop, open_body)
        except OSError as error:
            # 416: the offset is at or past the end of the object.
            if "InvalidRange" in str(error) or "416" in str(error):
                return
            raise
        try:
            while True:
                data = fsspec.asyn.sync(loop, body.read, 1024 * 1024)
                if not data:
                    return
                yield data
        finally:
            with contextlib.suppress(Exception):
                body.close()

    def make_directory(self, key: str) -> None:
        self.fs.pipe_file(key + "/", b"")

    def remove_directory(self, key: str) -> None:
        self.fs.rm_file(key + "/")
        self.fs.invalidate_cache(key)

    def write_empty(self, key: str) -> None:
        self.fs.pipe_file(key, b"")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_backend(config: MountConfig) -> Backend:
    protocol, root = parse_url(config.url)
    if protocol == "memory":
        return MemoryBackend(root)
    backend = S3Backend(root, config.s3)
    backend.check()
    return backend


# ------------------------------------------------------------------- handles


class Reader:
    """Sequential reads with a background stream; a seek restarts the stream."""

    def __init__(self, backend: Backend, key: str, size: int) -> None:
        self.backend = backend
        self.key = key
        self.size = size
        self.lock = threading.Condition()
        self.buffer = bytearray()
        self.start = 0  # offset of buffer[0]
        self.done = False
        self.error: BaseException | None = None
        self.generation = 0
        self.thread: threading.Thread | None = None
        self.closed = False

    def _restart(self, offset: int) -> None:
        self.generation += 1
        self.buffer = bytearray()
        self.start = offset
        self.done = False
        self.error = None
        generation = self.generation
        self.thread = threading.Thread(
            target=self._fill, args=(offset, generation), daemon=True
        )
        self.thread.start()

    def _fill(self, offset: int, generation: int) -> None:
        try:
            for data in self.backend.stream(self.key, offset):
                with self.lock:
                    while (
                        self.generation == generation
                        and not self.closed
                        and len(self.buffer) >= READ_AHEAD_BYTES
                    ):
                        self.lock.wait()
                    if self.generation != generation or self.closed:
                        return
                    self.buffer += data
                    self.lock.notify_all()
        except Exception as error:
            with self.lock:
                if self.generation == generation:
                    self.error = error
        with self.lock:
            if self.generation == generation:
                self.done = True
                self.lock.notify_all()

    def read(self, size: int, offset: int) -> bytes:
        if offset >= self.size or size <= 0:
            return b""
        size = min(size, self.size - offset)
        with self.lock:
            end = self.start + len(self.buffer)
            if (
                self.thread is None
                or offset < self.start
                or offset > end + READ_AHEAD_BYTES // 2
            ):
                self._restart(offset)
            # Keep READ_BEHIND_BYTES before the offset, because the kernel's
            # parallel readahead delivers reads out of order. Dropping the
            # rest lets the stream go on filling the window.
            drop = offset - READ_BEHIND_BYTES - self.start
            if drop > 0:
                del self.buffer[:drop]
                self.start += drop
                self.lock.notify_all()
            while self.start + len(self.buffer) < offset + size and not self.done:
                self.lock.wait()
            if self.error is not None and self.start + len(self.buffer) < offset + size:
                raise _os_error(self.error)
            relative = offset - self.start
            return bytes(self.buffer[relative : relative + size])

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.buffer = bytearray()
            self.lock.notify_all()


@dataclass(eq=False)
class Handle:
    key: str
    flags: int
    reader: Reader | None = None
    # Temporary file with the whole content while the file is open for writing.
    temp: Any = None
    dirty: bool = False
    # Set when the file was deleted while open: like an unlinked inode, the
    # handle stays usable but its content is never uploaded.
    unlinked: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _os_error(error: BaseException) -> OSError:
    """Translate a backend exception into an OSError with a fitting errno."""
    if isinstance(error, OSError) and isinstance(error.errno, int) and error.errno > 0:
        return OSError(error.errno, os.strerror(error.errno))
    if isinstance(error, FileNotFoundError):
        return OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    if isinstance(error, PermissionError):
        return OSError(errno.EACCES, os.strerror(errno.EACCES))
    log.warning(
        "backend request failed: %s: %s", type(error).__name__, _short(str(error))
    )
    return OSError(errno.EIO, os.strerror(errno.EIO))


def _fail(number: int) -> OSError:
    return OSError(number, os.strerror(number))


# -------------------------------------------------------------------- bridge


def make_bridge_class() -> type:
    """Build the mfusepy classes; only servers call it, as mfusepy loads libfuse."""
    import mfusepy

    class FsspecBridge(mfusepy.Operations):
        use_ns = True
        # Operations on an open file get its handle and no path, so a file
        # deleted while open (hard_remove) stays usable through its handle.
        flag_nopath = True
        flag_nullpath_ok = True

        def __init__(self, backend: Backend, config: MountConfig) -> None:
            self.backend = backend
            self.config = config
            self.read_only = config.read_only
            self.handles: dict[int, Handle] = {}
            self.next_handle = 1
            self.table_lock = threading.Lock()
            self.info_cache: dict[str, tuple[float, dict[str, Any]]] = {}
            self.mounted_at = time.time_ns()

        # Paths and attributes.

        def key(self, path: str) -> str:
            """Return the backend key of a FUSE path, or raise an OSError."""
            if path == "/":
                return self.backend.root
            parts = path.strip("/").split("/")
            for part in parts:
                if part in ("", ".", ".."):
                    raise _fail(errno.EINVAL)
                try:
                    encoded = part.encode("utf-8")
                except UnicodeEncodeError:
                    # Bytes that are not UTF-8 arrive as surrogates; S3 keys
                    # must be UTF-8.
                    raise _fail(errno.EILSEQ) from None
                if len(encoded) > MAX_NAME_BYTES:
                    raise _fail(errno.ENAMETOOLONG)
                # S3 listings are XML, which does not carry every control
                # character intact, so such names are rejected, not mangled.
                if any(
                    ord(character) < 0x20 or ord(character) == 0x7F
                    for character in part
                ):
                    raise _fail(errno.EINVAL)
            key = self.backend.root + "/" + "/".join(parts)
            if len(key.encode()) > MAX_KEY_BYTES:
                raise _fail(errno.ENAMETOOLONG)
            if posixpath.normpath(key) != key or not key.startswith(
                self.backend.root + "/"
            ):
                raise _fail(errno.EINVAL)
            return key

        def _check_writable(self) -> None:
            if self.read_only:
                raise _fail(errno.EROFS)

        def _attributes(self, info: dict[str, Any]) -> dict[str, Any]:
            is_directory = info.get("type") == "directory"
            mtime = _mtime_ns(info) or self.mounted_at
            return {
                "st_mode": (stat.S_IFDIR | DIRECTORY_MODE)
                if is_directory
                else (stat.S_IFREG | FILE_MODE),
                "st_nlink": 2 if is_directory else 1,
                "st_size": 0 if is_directory else int(info.get("size") or 0),
                "st_uid": self.config.uid,
                "st_gid": self.config.gid,
                "st_mtime": mtime,
                "st_atime": mtime,
                "st_ctime": mtime,
                "st_blksize": 1024 * 1024,
                "st_blocks": (int(info.get("size") or 0) + 511) // 512,
            }

        def _info(self, key: str) -> dict[str, Any]:
            cached = self.info_cache.get(key)
            if cached is not None and time.monotonic() - cached[0] < INFO_CACHE_SECONDS:
                return cached[1]
            try:
                info = self.backend.info(key)
            except Exception as error:
                raise _os_error(error) from None
            self.info_cache[key] = (time.monotonic(), info)
            return info

        def _forget(self, *keys: str) -> None:
            for key in keys:
                self.info_cache.pop(key, None)
                self.info_cache.pop(posixpath.dirname(key), None)
                self.backend.invalidate(key)
                self.backend.invalidate(posixpath.dirname(key))

        def _open_writer(self, key: str) -> Handle | None:
            with self.table_lock:
                for handle in self.handles.values():
                    if (
                        handle.key == key
                        and handle.temp is not None
                        and not handle.unlinked
                    ):
                        return handle
            return None

        def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
            if path is None:
                # fstat: with flag_nopath, libfuse passes the handle only.
                if fh is None:
                    raise _fail(errno.EBADF)
                handle = self._handle(fh)
                if handle.temp is None:
                    return self._attributes(self._info(handle.key))
                size = os.fstat(handle.temp.fileno()).st_size
                attributes = self._attributes({"type": "file", "size": size})
                attributes["st_mtime"] = attributes["st_ctime"] = time.time_ns()
                if handle.unlinked:
                    attributes["st_nlink"] = 0
                return attributes
            if path == "/":
                return self._attributes({"type": "directory"})
            key = self.key(path)
            writer = self._open_writer(key)
            if writer is not None:
                size = os.fstat(writer.temp.fileno()).st_size
                attributes = self._attributes({"type": "file", "size": size})
                attributes["st_mtime"] = attributes["st_ctime"] = time.time_ns()
                return attributes
            return self._attributes(self._info(key))

        def opendir(self, path: str) -> int:
            return self._add_handle(Handle(key=self.key(path), flags=os.O_RDONLY))

        def releasedir(self, path: str | None, fh: int) -> int:
            with self.table_lock:
                self.handles.pop(fh, None)
            return 0

        def readdir(self, path: str | None, fh: int) -> list[str]:
            key = self._handle(fh).key if path is None else self.key(path)
            try:
                entries = self.backend.listdir(key)
            except Exception as error:
                raise _os_error(error) from None
            names = [".", ".."]
            seen: set[str] = set()
            now = time.monotonic()
            for entry in entries:
                child = entry["name"].rstrip("/")
                name = posixpath.basename(child)
                if not name or name in (".", ".."):
                    continue
                # An object "a" and keys below "a/" are one name here: the
                # directory wins, as a file and a directory cannot share it.
                if name in seen:
                    if entry.get("type") == "directory":
                        self.info_cache[child] = (now, entry)
                    continue
                seen.add(name)
                self.info_cache[child] = (now, entry)
                names.append(name)
            return names

        def statfs(self, path: str) -> dict[str, int]:
            blocks = 1 << 40
            return {
                "f_bsize": 1024 * 1024,
                "f_frsize": 1024 * 1024,
                "f_blocks": blocks,
                "f_bfree": blocks,
                "f_bavail": blocks,
                "f_files": 1 << 30,
                "f_ffree": 1 << 30,
                "f_namemax": MAX_NAME_BYTES,
            }

        # Files.

        def _add_handle(self, handle: Handle) -> int:
            with self.table_lock:
                if len(self.handles) >= MAX_OPEN_FILES:
                    raise _fail(errno.ENFILE)
                number = self.next_handle
                self.next_handle += 1
                self.handles[number] = handle
                return number

        def _temp(self) -> Any:
            # NOTE: the cache dir has no quota; a sandbox can fill the data
            # dir's file system with writes up to MAX_FILE_BYTES per file.
            return tempfile.TemporaryFile(dir=self.config.cache_dir)

        def open(self, path: str, flags: int) -> int:
            key = self.key(path)
            access = flags & os.O_ACCMODE
            info = self._info(key)
            if info.get("type") == "directory":
                raise _fail(errno.EISDIR)
            handle = Handle(key=key, flags=flags)
            if access == os.O_RDONLY and not flags & os.O_TRUNC:
                handle.reader = Reader(self.backend, key, int(info.get("size") or 0))
                return self._add_handle(handle)
            self._check_writable()
            handle.temp = self._temp()
            if flags & os.O_TRUNC:
                handle.dirty = True
            else:
                try:
                    for data in self.backend.stream(key, 0):
                        handle.temp.write(data)
                    handle.temp.flush()
                except Exception as error:
                    handle.temp.close()
                    raise _os_error(error) from None
            return self._add_handle(handle)

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            self._check_writable()
            key = self.key(path)
            handle = Handle(key=key, flags=os.O_WRONLY, temp=self._temp(), dirty=True)
            number = self._add_handle(handle)
            # Upload at once, so that the file exists for other clients and
            # for a directory listing before the first close.
            try:
                self._upload(handle)
            except OSError:
                self.release(path, number)
                raise
            return number

        def _handle(self, fh: int) -> Handle:
            handle = self.handles.get(fh)
            if handle is None:
                raise _fail(errno.EBADF)
            return handle

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            handle = self._handle(fh)
            if handle.temp is not None:
                with handle.lock:
                    return os.pread(handle.temp.fileno(), size, offset)
            # getattr reports an open writer's copy, so reads show it too.
            writer = self._open_writer(handle.key)
            if writer is not None:
                with writer.lock:
                    return os.pread(writer.temp.fileno(), size, offset)
            assert handle.reader is not None
            return handle.reader.read(size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            handle = self._handle(fh)
            if handle.temp is None:
                raise _fail(errno.EBADF)
            with handle.lock:
                fd = handle.temp.fileno()
                if handle.flags & os.O_APPEND:
                    offset = os.fstat(fd).st_size
                if offset + len(data) > MAX_FILE_BYTES:
                    raise _fail(errno.EFBIG)
                written = os.pwrite(fd, data, offset)
                handle.dirty = True
            return written

        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            self._check_writable()
            if length > MAX_FILE_BYTES:
                raise _fail(errno.EFBIG)
            handle = self.handles.get(fh) if fh is not None else None
            if path is None:
                if handle is None or handle.temp is None:
                    raise _fail(errno.EBADF)
                with handle.lock:
                    os.ftruncate(handle.temp.fileno(), length)
                    handle.dirty = True
                return 0
            key = self.key(path)
            if handle is None or handle.temp is None:
                handle = self._open_writer(key)
            if handle is not None and handle.temp is not None:
                with handle.lock:
                    os.ftruncate(handle.temp.fileno(), length)
                    handle.dirty = True
                return 0
            # truncate(2) on a file that no handle has open: rewrite the object.
            temporary = Handle(
                key=key, flags=os.O_WRONLY, temp=self._temp(), dirty=True
            )
            try:
                if length:
                    for data in self.backend.stream(key, 0):
                        temporary.temp.write(data)
                        if temporary.temp.tell() >= length:
                            break
                    temporary.temp.flush()
                os.ftruncate(temporary.temp.fileno(), length)
                self._upload(temporary)
            except OSError:
                raise
            except Exception as error:
                raise _os_error(error) from None
            finally:
                temporary.temp.close()
            return 0

        def _upload(self, handle: Handle) -> None:
            with handle.lock:
                if not handle.dirty or handle.unlinked:
                    return
                handle.temp.flush()
                try:
                    size = os.fstat(handle.temp.fileno()).st_size
                    if size == 0:
                        self.backend.write_empty(handle.key)
                    else:
                        self.backend.upload(
                            f"/proc/self/fd/{handle.temp.fileno()}", handle.key
                        )
                except Exception as error:
                    raise _os_error(error) from None
                finally:
                    self._forget(handle.key)
                handle.dirty = False

        def flush(self, path: str, fh: int) -> int:
            handle = self._handle(fh)
            if handle.temp is not None:
                self._upload(handle)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            return self.flush(path, fh)

        def release(self, path: str, fh: int) -> int:
            with self.table_lock:
                handle = self.handles.pop(fh, None)
            if handle is None:
                return 0
            try:
                if handle.temp is not None:
                    self._upload(handle)
            finally:
                if handle.temp is not None:
                    handle.temp.close()
                if handle.reader is not None:
                    handle.reader.close()
            return 0

        # Names.

        def unlink(self, path: str) -> int:
            self._check_writable()
            key = self.key(path)
            if self._info(key).get("type") == "directory":
                raise _fail(errno.EISDIR)
            with self.table_lock:
                for handle in self.handles.values():
                    if handle.key == key:
                        handle.unlinked = True
            try:
                self.backend.remove_file(key)
            except Exception as error:
                raise _os_error(error) from None
            finally:
                self._forget(key)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            self._check_writable()
            key = self.key(path)
            with contextlib.suppress(OSError):
                self._info(key)
                raise _fail(errno.EEXIST)
            try:
                self.backend.make_directory(key)
            except Exception as error:
                raise _os_error(error) from None
            finally:
                self._forget(key)
            return 0

        def rmdir(self, path: str) -> int:
            self._check_writable()
            key = self.key(path)
            if self._info(key).get("type") != "directory":
                raise _fail(errno.ENOTDIR)
            try:
                children = self.backend.listdir(key)
            except Exception as error:
                raise _os_error(error) from None
            if children:
                raise _fail(errno.ENOTEMPTY)
            try:
                self.backend.remove_directory(key)
            except FileNotFoundError:
                # A directory that exists only because of its former children.
                pass
            except Exception as error:
                raise _os_error(error) from None
            finally:
                self._forget(key)
            return 0

        def rename(self, old: str, new: str, flags: int = 0) -> int:
            self._check_writable()
            source, destination = self.key(old), self.key(new)
            if flags & ~RENAME_NOREPLACE:
                # RENAME_EXCHANGE and RENAME_WHITEOUT cannot be done on objects.
                raise _fail(errno.EINVAL)
            if source == destination:
                return 0
            if destination.startswith(source + "/"):
                raise _fail(errno.EINVAL)
            info = self._info(source)
            try:
                target = self._info(destination)
            except FileNotFoundError:
                target = None
            except OSError as error:
                if error.errno != errno.ENOENT:
                    raise
                target = None
            if target is not None:
                if flags & RENAME_NOREPLACE:
                    raise _fail(errno.EEXIST)
                if target.get("type") == "directory":
                    if info.get("type") != "directory":
                        raise _fail(errno.EISDIR)
                    if self.backend.listdir(destination):
                        raise _fail(errno.ENOTEMPTY)
                elif info.get("type") == "directory":
                    raise _fail(errno.ENOTDIR)
            writer = self._open_writer(source)
            if writer is not None:
                self._upload(writer)
            try:
                if info.get("type") == "directory":
                    self._rename_directory(source, destination, target is not None)
                else:
                    self.backend.copy_file(source, destination)
                    self.backend.remove_file(source)
            except OSError:
                raise
            except Exception as error:
                raise _os_error(error) from None
            finally:
                self._forget(source, destination)
            with self.table_lock:
                for handle in self.handles.values():
                    if handle.key == source:
                        handle.key = destination
            return 0

        def _rename_directory(
            self, source: str, destination: str, exists: bool
        ) -> None:
            files = self.backend.fs.find(source, withdirs=True, detail=True)
            if len(files) > MAX_RENAME_ENTRIES:
                raise _fail(errno.EXDEV)
            if not exists:
                self.backend.make_directory(destination)
            entries = sorted(files.items())
            for name, entry in entries:
                relative = name.rstrip("/")[len(source) + 1 :]
                if not relative:
                    continue
                target = destination + "/" + relative
                if entry.get("type") == "directory":
                    with contextlib.suppress(FileExistsError):
                        self.backend.make_directory(target)
                else:
                    self.backend.copy_file(name, target)
            for name, entry in reversed(entries):
                relative = name.rstrip("/")[len(source) + 1 :]
                if not relative:
                    continue
                if entry.get("type") == "directory":
                    with contextlib.suppress(FileNotFoundError):
                        self.backend.remove_directory(name.rstrip("/"))
                else:
                    self.backend.remove_file(name)
                self._forget(name.rstrip("/"))
            with contextlib.suppress(FileNotFoundError):
                self.backend.remove_directory(source)

        # What objects cannot do.

        def chmod(self, path: str | None, mode: int) -> int:
            """Accept the mode a file already has; any other mode is EPERM.

            Objects have no modes, so files are always 0644 and directories
            0755. Asking for that mode (as the file API does) changes nothing.
            """
            if path is None:
                raise _fail(errno.EPERM)
            info = self._info(self.key(path)) if path != "/" else {"type": "directory"}
            current = DIRECTORY_MODE if info.get("type") == "directory" else FILE_MODE
            if stat.S_IMODE(mode) != current:
                raise _fail(errno.EPERM)
            return 0

        def chown(self, path: str | None, uid: int, gid: int) -> int:
            """Accept the owner a file already has (or -1); any other owner is EPERM."""
            if path is not None:
                self.key(path)
            unchanged = (-1, 0xFFFFFFFF)
            if uid not in (*unchanged, self.config.uid) or gid not in (
                *unchanged,
                self.config.gid,
            ):
                raise _fail(errno.EPERM)
            return 0

        def symlink(self, target: str, source: str) -> int:
            raise _fail(errno.EPERM)

        def link(self, target: str, source: str) -> int:
            raise _fail(errno.EPERM)

        def mknod(self, path: str, mode: int, dev: int) -> int:
            raise _fail(errno.EPERM)

        def readlink(self, path: str) -> str:
            raise _fail(errno.EINVAL)

        def utimens(
            self,
            path: str | None,
            times: tuple[int, int] | None = None,
            fh: int | None = None,
        ) -> int:
            """Set the time to now by rewriting the object; other times are EPERM.

            An object's modification time is the time it was last written, so
            ``touch`` works and an explicit past time cannot be stored.
            """
            self._check_writable()
            if times is not None:
                raise _fail(errno.EPERM)
            if path is None:
                # futimens: with flag_nopath only the handle identifies the file.
                if fh is None:
                    raise _fail(errno.EBADF)
                handle = self._handle(fh)
                if handle.temp is not None:
                    with handle.lock:
                        handle.dirty = True
                    self._upload(handle)
                    return 0
                key = handle.key
            else:
                key = self.key(path)
            if self._info(key).get("type") == "directory":
                raise _fail(errno.EPERM)
            writer = self._open_writer(key)
            if writer is not None:
                with writer.lock:
                    writer.dirty = True
                self._upload(writer)
                return 0
            temporary = Handle(
                key=key, flags=os.O_WRONLY, temp=self._temp(), dirty=True
            )
            try:
                for data in self.backend.stream(key, 0):
                    temporary.temp.write(data)
                self._upload(temporary)
            except OSError:
                raise
            except Exception as error:
                raise _os_error(error) from None
            finally:
                temporary.temp.close()
            return 0

        def destroy(self, path: str) -> None:
            with self.table_lock:
                handles = list(self.handles.items())
            for number, _ in handles:
                with contextlib.suppress(OSError):
                    self.release("", number)

    class BridgeFUSE(mfusepy.FUSE):
        """mfusepy.FUSE with the arguments that mfusepy 3.1 drops passed through.

        Those are rename flags, utimensat's raw times, and the handle of
        ftruncate and futimens.
        """

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(
                old.decode(self.encoding, self.errors),
                new.decode(self.encoding, self.errors),
                flags,
            )

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            decoded = None if path is None else path.decode(self.encoding, self.errors)
            fh = fip.contents.fh if fip else None
            return self.operations.truncate(decoded, length, fh)

        def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            times = None
            if buf:
                both = (buf.contents.actime, buf.contents.modtime)
                if all(spec.tv_nsec == UTIME_OMIT for spec in both):
                    return 0
                if not all(spec.tv_nsec in (UTIME_NOW, UTIME_OMIT) for spec in both):
                    times = tuple(spec.tv_sec * 10**9 + spec.tv_nsec for spec in both)
            decoded = None if path is None else path.decode(self.encoding, self.errors)
            fh = fip.contents.fh if fip else None
            return self.operations.utimens(decoded, times, fh)

    return FsspecBridge, BridgeFUSE


def _mtime_ns(info: dict[str, Any]) -> int | None:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if value is None:
        return None
    if isinstance(value, int | float):
        return int(value * 1e9)
    with contextlib.suppress(AttributeError, TypeError, ValueError, OverflowError):
        return int(value.timestamp() * 1e9)
    return None


# -------------------------------------------------------------------- server


def _reply(message: dict[str, Any]) -> None:
    # The daemon may be gone already.
    with contextlib.suppress(BrokenPipeError):
        os.write(1, (json.dumps(message) + "\n").encode())


def _watch_parent() -> None:
    """Stop the server when stdin closes, which happens when the daemon dies."""
    while True:
        try:
            data = os.read(0, 4096)
        except InterruptedError:
            continue
        if not data:
            break
    os.kill(os.getpid(), signal.SIGTERM)


def serve() -> int:
    """Body of ``python -m engine.storage.fuse``."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s engine.storage.fuse[%(process)d]:"
        " %(message)s",
    )
    # botocore logs request details at DEBUG; nothing below WARNING is needed.
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec", "mfusepy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    line = b""
    while not line.endswith(b"\n"):
        data = os.read(0, 65536)
        if not data:
            return 2
        line += data
    try:
        config = MountConfig.from_json(line.decode())
        backend = make_backend(config)
    except (ServerError, InvalidArgument) as error:
        _reply({"ok": False, "error": str(error)})
        return 1
    except Exception as error:
        _reply({"ok": False, "error": f"{type(error).__name__}: {_short(str(error))}"})
        return 1
    bridge_class, fuse_class = make_bridge_class()
    bridge = bridge_class(backend, config)
    original_init = bridge.init

    mounted = threading.Event()

    def init(path: str) -> None:
        # Mounting needed root; serving sandbox requests does not. The
        # kernel checks permissions itself (default_permissions), and the
        # open /dev/fuse descriptor keeps working.
        try:
            os.setgroups([])
            os.setresgid(config.server_uid, config.server_uid, config.server_uid)
            os.setresuid(config.server_uid, config.server_uid, config.server_uid)
        except OSError as error:
            _reply({"ok": False, "error": f"dropping root failed: {error}"})
            os._exit(1)
        mounted.set()
        _reply({"ok": True})
        original_init(path)

    bridge.init = init  # type: ignore[method-assign]
    threading.Thread(target=_watch_parent, daemon=True).start()
    options: dict[str, Any] = {
        "foreground": True,
        "allow_other": True,
        # Unlink a file that is still open at once, as Linux does, instead of
        # renaming it to a visible .fuse_hidden object until its last close.
        "hard_remove": True,
        "default_permissions": True,
        "fsname": config.fsname,
        "subtype": "engine",
        "attr_timeout": 1.0,
        "entry_timeout": 1.0,
        "negative_timeout": 0.0,
    }
    if config.read_only:
        options["ro"] = True
    # libfuse 3.14's fuse_main_real prints "Ignoring invalid max threads
    # value" to stderr at start; it then uses its default of 10 threads.
    try:
        fuse_class(bridge, config.mountpoint, **options)
    except RuntimeError as error:
        if mounted.is_set():
            # libfuse returns an error code after a signal ended the session.
            return 0
        _reply({"ok": False, "error": f"mounting {config.mountpoint} failed: {error}"})
        return 1
    return 0


# ------------------------------------------------------------------- manager


@dataclass
class FuseServer:
    """A running server and its mount, as the manager started them."""

    name: str
    pid: int
    mountpoint: Path
    cache_dir: Path
    process: subprocess.Popen[bytes]


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mounted_paths() -> dict[str, str]:
    """Return mount point -> "major:minor" from this process's mount table."""
    result = {}
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            fields = line.split()
            # mountinfo escapes space, tab, newline and backslash as \\ooo.
            raw = _OCTAL_ESCAPE.sub(lambda match: bytes([int(match[1], 8)]), fields[4])
            point = raw.decode(errors="surrogateescape")
            result[point] = fields[2].decode()
    return result


def unmount(path: Path) -> None:
    """Detach the mount at ``path`` (and what is below it) without waiting on FUSE."""
    from engine.runtime import libc

    with contextlib.suppress(OSError):
        libc.umount2(str(path), libc.MNT_DETACH)


def abort_connection(device: str) -> None:
    """Fail every pending and future request of a FUSE connection at once."""
    minor = device.partition(":")[2]
    with contextlib.suppress(OSError):
        Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")


class FuseManager:
    """Starts and stops FUSE servers below ``DATA_DIR/fuse``.

    ``fuse/mnt/NAME`` are mount points, ``fuse/cache/NAME`` the servers'
    write buffers and ``fuse/pids/NAME`` their pids, so that the next start
    can kill what a crashed daemon left.
    """

    def __init__(self, data_dir: Path, uid: int) -> None:
        self.base = data_dir / "fuse"
        self.mnt = self.base / "mnt"
        self.cache = self.base / "cache"
        self.pids = self.base / "pids"
        self.uid = uid
        self.servers: dict[str, FuseServer] = {}
        self.lock = threading.Lock()
        self.shared = False
        # The cgroup every server joins before it reads its configuration.
        self.cgroup: Cgroup | None = None

    def prepare(self) -> None:
        """Sweep leftovers, then make ``fuse/mnt`` a shared mount.

        Call it before any supervisor is forked: a mount made later below a
        shared mount propagates into the supervisors' mount namespaces, which
        copied it as a slave.
        """
        self.sweep()
        for directory in (self.base, self.mnt, self.cache, self.pids):
            directory.mkdir(mode=0o711, exist_ok=True)
            os.chmod(directory, 0o711)
        from engine.runtime import libc

        libc.mount(str(self.mnt), str(self.mnt), None, libc.MS_BIND)
        libc.mount(None, str(self.mnt), None, libc.MS_SHARED)
        self.shared = True

    def sweep(self) -> None:
        """Kill leftover servers by pid and detach leftover mounts."""
        if self.pids.is_dir():
            for entry in self.pids.iterdir():
                with contextlib.suppress(ValueError, OSError):
                    pid = int(entry.read_text().split()[0])
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"engine.storage.fuse" in cmdline:
                        log.warning(
                            "killing leftover FUSE server %d (%s)", pid, entry.name
                        )
                        os.kill(pid, signal.SIGKILL)
                entry.unlink(missing_ok=True)
        prefix = str(self.mnt)
        mounts = mounted_paths()
        leftovers = sorted(
            (
                point
                for point in mounts
                if point == prefix or point.startswith(prefix + "/")
            ),
            key=len,
            reverse=True,
        )
        for point in leftovers:
            if point != prefix:
                log.warning("detaching leftover FUSE mount %s", point)
                abort_connection(mounts[point])
            unmount(Path(point))
        # Each crashed engine left one bind of fuse/mnt, stacked on the same
        # path; the mount table lists the path once.
        for _ in range(MAX_STACKED_BINDS):
            if prefix not in mounted_paths():
                break
            unmount(self.mnt)
        if self.mnt.is_dir():
            for entry in self.mnt.iterdir():
                with contextlib.suppress(OSError):
                    entry.rmdir()
        if self.cache.is_dir():
            from engine.storage.trees import remove_tree

            for entry in self.cache.iterdir():
                remove_tree(entry)

    def start(self, name: str, config: MountConfig) -> FuseServer:
        """Start a server for ``config`` mounted at ``fuse/mnt/NAME``; blocking.

        Raises FailedPrecondition with the server's message for a bad bucket
        or endpoint, and Unavailable when it does not mount in time. Nothing
        is left behind on failure.
        """
        mountpoint = self.mnt / name
        cache_dir = self.cache / name
        config = MountConfig(
            **{
                **config.__dict__,
                "mountpoint": str(mountpoint),
                "cache_dir": str(cache_dir),
            }
        )
        process = None
        try:
            mountpoint.mkdir(mode=0o700)
            os.chown(mountpoint, self.uid, self.uid)
            cache_dir.mkdir(mode=0o700)
            os.chown(cache_dir, config.server_uid, config.server_uid)
            process = subprocess.Popen(
                [sys.executable, "-m", "engine.storage.fuse"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                close_fds=True,
                start_new_session=True,
                env=_server_environment(),
            )
            (self.pids / name).write_text(f"{process.pid}\n")
            if self.cgroup is not None:
                for procs in self.cgroup.procs_files():
                    write_control(procs, str(process.pid))
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(config.to_json().encode() + b"\n")
            process.stdin.flush()
            reply = _read_reply(process, START_TIMEOUT)
            if not reply.get("ok"):
                raise FailedPrecondition(reply.get("error") or "the FUSE server failed")
        except BaseException:
            if process is not None:
                self._kill(process, mountpoint)
            self._remove(name, mountpoint, cache_dir)
            raise
        server = FuseServer(name, process.pid, mountpoint, cache_dir, process)
        with self.lock:
            self.servers[name] = server
        log.info("FUSE server %d mounted %s", process.pid, mountpoint)
        return server

    def stop(self, name: str) -> None:
        """Stop a server and remove its mount; blocks about STOP_TIMEOUT s at most."""
        with self.lock:
            server = self.servers.pop(name, None)
        if server is None:
            return
        process = server.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("FUSE server %d ignored SIGTERM; killing it", server.pid)
        self._kill(process, server.mountpoint)
        self._remove(name, server.mountpoint, server.cache_dir)
        log.info("FUSE server %d for %s stopped", server.pid, server.mountpoint)

    def stop_all(self) -> None:
        for name in list(self.servers):
            self.stop(name)
        if self.shared:
            unmount(self.mnt)
            self.shared = False

    @staticmethod
    def _kill(process: subprocess.Popen[bytes], mountpoint: Path) -> None:
        device = mounted_paths().get(str(mountpoint))
        if device is not None and process.poll() is None:
            abort_connection(device)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Only a task stuck in the kernel outlives SIGKILL. The mount is
            # detached below all the same, and the process that inherits the
            # zombie reaps it.
            log.error("FUSE server %d survived SIGKILL; leaving it", process.pid)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if str(mountpoint) in mounted_paths():
            unmount(mountpoint)

    def _remove(self, name: str, mountpoint: Path, cache_dir: Path) -> None:
        # rmdir, never a recursive delete: if the mount were still there, a
        # recursive delete would remove the bucket's objects.
        with contextlib.suppress(OSError):
            mountpoint.rmdir()
        from engine.storage.trees import remove_tree

        if str(cache_dir) not in mounted_paths():
            remove_tree(cache_dir)
        (self.pids / name).unlink(missing_ok=True)


def _server_environment() -> dict[str, str]:
    """Build the server's environment, without the daemon's AWS_* variables."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "HOME", "TMPDIR")
    environment = {key: os.environ[key] for key in keep if key in os.environ}
    # s3fs would otherwise read ~/.aws of root.
    environment["AWS_CONFIG_FILE"] = os.devnull
    environment["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    environment["AWS_EC2_METADATA_DISABLED"] = "true"
    return environment


def _read_reply(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Unavailable(
                f"the FUSE server {process.pid} did not mount within {timeout:.0f} s"
            )
        if not protocol.wait_readable(fd, remaining):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            code = process.wait()
            raise Unavailable(
                f"the FUSE server {process.pid} exited with status {code} before"
                " mounting; the daemon's log has its output"
            )
        data += chunk
    return json.loads(data)


if __name__ == "__main__":
    sys.exit(serve())
