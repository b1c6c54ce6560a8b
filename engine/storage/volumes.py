"""Named volumes: directories that outlive sandboxes and that many sandboxes mount.

The local backend keeps each volume in the data dir::

    volumes/                mode 0711, owned by root
    volumes/NAME/           mode 0700, owned by uid_base: only root and the
                            sandbox supervisors, which bind-mount data/, reach it
    volumes/NAME/volume.json    {"name": ..., "created_at": ...}
    volumes/NAME/data/      the volume's root, owned by uid_base (root inside)

Entries of ``volumes/`` that start with a dot are internal: ``.new-*`` is a
volume being created and ``.deleted-*`` one being removed.

Sandbox code owns everything below ``data/`` and may leave symlinks there that
point anywhere, while the daemon runs as root on the host. So every path of the
volume API is opened with openat2(2) and RESOLVE_IN_ROOT from a descriptor of
``data/``: ".." and symlinks, absolute or relative, resolve inside the volume,
as they would inside a sandbox that mounts it. Operations on a path's last
component (stat, rename, unlink, mkdir) use that descriptor of the parent
directory and never follow a symlink there. Directory walks open each
directory with RESOLVE_NO_SYMLINKS, so they never follow a symlink at all.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fnmatch
import functools
import json
import logging
import os
import posixpath
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.errors import (
    AlreadyExists,
    EngineError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from engine.runtime import libc

logger = logging.getLogger(__name__)

# Volume names become directory names, so they may not contain "/" or start
# with a dot, which marks internal entries.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
MAX_PATH_BYTES = 4096
# Upload and Download move file data in chunks of this many bytes.
CHUNK_BYTES = 1024 * 1024
DEFAULT_LIST_LIMIT = 10_000
MAX_LIST_LIMIT = 100_000
# Temporary files and directories of uploads and copies start with this, in
# the destination's directory, until they are renamed into place.
TEMP_PREFIX = ".engine-"

# A path of the volume API: resolved as if the volume's root were "/".
_IN_VOLUME = libc.RESOLVE_IN_ROOT | libc.RESOLVE_NO_MAGICLINKS | libc.RESOLVE_NO_XDEV
# A directory of a walk: below the descriptor, and no symlink anywhere.
_NO_SYMLINKS = (
    libc.RESOLVE_BENEATH
    | libc.RESOLVE_NO_SYMLINKS
    | libc.RESOLVE_NO_MAGICLINKS
    | libc.RESOLVE_NO_XDEV
)
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_GLOB_CHARACTERS = frozenset("*?[")

_ERRORS: dict[int, type[EngineError]] = {
    errno.ENOENT: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.ENOTEMPTY: FailedPrecondition,
    errno.EBUSY: FailedPrecondition,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
    errno.EROFS: PermissionDenied,
    errno.ENOSPC: ResourceExhausted,
    errno.EDQUOT: ResourceExhausted,
    errno.EMFILE: ResourceExhausted,
}
_REASONS = {
    errno.ELOOP: "too many levels of symbolic links",
    errno.EXDEV: "the path crosses a mount point",
    errno.EINVAL: "invalid argument (a directory cannot move into itself)",
}


class PathType(enum.StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    # A FIFO, socket or device node.
    OTHER = "other"


@dataclass(frozen=True)
class VolumeInfo:
    """A volume. The usage fields are None where it was not computed."""

    name: str
    created_at: float
    # Sum of the sizes of the volume's regular files, each hard link once.
    size_bytes: int | None = None
    file_count: int | None = None
    # Sandboxes, PENDING or RUNNING, that mount the volume now.
    sandbox_ids: tuple[str, ...] = ()
    # fsspec URL of the backend; "" for the local directory.
    url: str = ""


@dataclass(frozen=True)
class PathInfo:
    """A file, directory or symlink of a volume, as lstat(2) reports it."""

    # Relative to the volume's root, "/"-separated; "" is the root itself.
    path: str
    type: PathType
    size: int
    # Permission bits, st_mode & 0o7777.
    mode: int
    mtime: float
    # Target of a symlink, else "".
    target: str = ""


def check_name(name: str) -> None:
    """Raise InvalidArgument unless ``name`` is a valid volume name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid volume name {name!r}: use 1 to 63 lowercase letters, digits,"
            " '.', '_' or '-', starting with a letter or digit"
        )


def split_path(path: str, field: str = "path") -> list[str]:
    """Return the components of a path relative to a volume's root.

    A leading "/" is optional, and "." and ".." are resolved lexically, never
    above the root, so "" , "/" and "." all name the root and give [].
    """
    if not isinstance(path, str):
        raise InvalidArgument(f"invalid {field} {path!r}: expected a string")
    if "\0" in path:
        raise InvalidArgument(f"invalid {field} {path!r}: contains a NUL byte")
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise InvalidArgument(f"invalid {field}: longer than {MAX_PATH_BYTES} bytes")
    normal = posixpath.normpath("/" + path)
    return [part for part in normal.split("/") if part]


def has_glob(parts: list[str]) -> bool:
    return any(_GLOB_CHARACTERS & set(part) for part in parts)


def glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Return whether path ``parts`` match glob ``pattern``, both split on "/".

    Each pattern component is matched with fnmatch against one path component,
    so "*", "?" and "[...]" never match a "/", and "*" matches names starting
    with a dot. A "**" component matches zero or more whole components.
    """

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(parts)
        if pattern[i] == "**":
            return match(i + 1, j) or (j < len(parts) and match(i, j + 1))
        return (
            j < len(parts)
            and fnmatch.fnmatchcase(parts[j], pattern[i])
            and match(i + 1, j + 1)
        )

    return match(0, 0)


def _info(path: str, status: os.stat_result, target: str = "") -> PathInfo:
    if stat.S_ISREG(status.st_mode):
        kind = PathType.FILE
    elif stat.S_ISDIR(status.st_mode):
        kind = PathType.DIRECTORY
    elif stat.S_ISLNK(status.st_mode):
        kind = PathType.SYMLINK
    else:
        kind = PathType.OTHER
    return PathInfo(
        path=path,
        type=kind,
        size=status.st_size,
        mode=stat.S_IMODE(status.st_mode),
        mtime=status.st_mtime,
        target=target,
    )


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _translated(volume: str, path: str) -> Iterator[None]:
    """Turn an OSError into the EngineError for its errno, naming the path."""
    try:
        yield
    except OSError as error:
        code = error.errno or errno.EIO
        kind = _ERRORS.get(code, InvalidArgument)
        reason = _REASONS.get(code, os.strerror(code).lower())
        display = "/" + path if path else "the root"
        raise kind(f"{display} in volume {volume!r}: {reason}") from error


class Upload:
    """A file being written to a volume: a temporary file until ``commit``.

    ``commit`` renames it over the destination, so readers of the path see the
    old content or the whole new one, never a part.

    NOTE: if the daemon dies before ``commit`` or ``abort``, the temporary
    ``.engine-upload-*`` file stays in the volume, and nothing removes it.
    """

    def __init__(self, store: VolumeStore, volume: str, path: str, mode: int) -> None:
        if not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise InvalidArgument(
                f"invalid mode {mode!r}: expected permission bits from 0 to 0o777,"
                " such as 0o644"
            )
        self.volume = volume
        self.parts = split_path(path)
        self.path = "/".join(self.parts)
        if not self.parts:
            raise InvalidArgument(
                f"invalid path {path!r}: it names the root of volume {volume!r};"
                " upload to a file path such as 'data.csv'"
            )
        self.mode = mode
        self._uid = store.uid
        self.temp_name = f"{TEMP_PREFIX}upload-{secrets.token_hex(8)}"
        self.size = 0
        with store.root(volume) as root, _translated(volume, self.path):
            self._parent = store.make_parents(root, self.parts[:-1])
            try:
                self._fd = os.open(
                    self.temp_name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=self._parent,
                )
            except BaseException:
                os.close(self._parent)
                raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        with _translated(self.volume, self.path):
            while view:
                view = view[os.write(self._fd, view) :]
        self.size += len(data)

    def commit(self) -> PathInfo:
        """Make the file durable and rename it to its path; return its info."""
        leaf = self.parts[-1]
        try:
            with _translated(self.volume, self.path):
                os.fchown(self._fd, self._uid, self._uid)
                os.fchmod(self._fd, self.mode)
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
                os.rename(
                    self.temp_name,
                    leaf,
                    src_dir_fd=self._parent,
                    dst_dir_fd=self._parent,
                )
                # The rename itself is durable once the directory is synced.
                os.fsync(self._parent)
                status = os.stat(leaf, dir_fd=self._parent, follow_symlinks=False)
        except BaseException:
            self.abort()
            raise
        os.close(self._parent)
        self._parent = -1
        return _info(self.path, status)

    def abort(self) -> None:
        """Remove the temporary file; the destination keeps its old content."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._parent >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.temp_name, dir_fd=self._parent)
            os.close(self._parent)
            self._parent = -1


class Download:
    """A regular file of a volume, open for reading."""

    def __init__(self, store: VolumeStore, volume: str, path: str) -> None:
        self.volume = volume
        self.path = "/".join(split_path(path))
        with store.root(volume) as root, _translated(volume, self.path):
            # O_NONBLOCK keeps a FIFO left by sandbox code from blocking the
            # open, and O_NOCTTY keeps a terminal from becoming ours.
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            self._fd = libc.openat2(root, self.path or ".", flags, 0, _IN_VOLUME)
        status = os.fstat(self._fd)
        if not stat.S_ISREG(status.st_mode):
            os.close(self._fd)
            kind = "a directory" if stat.S_ISDIR(status.st_mode) else "not a file"
            raise InvalidArgument(
                f"/{self.path} in volume {volume!r} is {kind}; download a regular file"
            )
        self.info = _info(self.path, status)

    def read(self, size: int = CHUNK_BYTES) -> bytes:
        """Return up to ``size`` bytes, or b"" at the end of the file."""
        with _translated(self.volume, self.path):
            return os.read(self._fd, size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class VolumeStore:
    """The volumes of one data dir on the local file system.

    Methods are synchronous and may run in several threads at once. Deleting
    a volume does not check whether a sandbox mounts it: ``Engine.delete_volume``
    does, and is the way to delete one.
    """

    def __init__(self, data_dir: Path, uid: int, directory: Path | None = None) -> None:
        self.directory = directory or data_dir / "volumes"
        # Host uid of root inside sandboxes; it owns every file of a volume.
        self.uid = uid

    def prepare(self) -> None:
        """Create the volumes directory and remove what an interrupted call left."""
        self.directory.mkdir(mode=0o711, exist_ok=True)
        os.chown(self.directory, 0, 0)
        self.directory.chmod(0o711)
        for entry in self.directory.iterdir():
            if entry.name.startswith((".new-", ".deleted-")):
                logger.warning("removing leftover volume directory %s", entry)
                shutil.rmtree(entry, ignore_errors=True)

    # Volumes.

    def create(
        self, name: str, url: str = "", s3: dict[str, object] | None = None
    ) -> tuple[VolumeInfo, bool]:
        """Create volume ``name`` unless it exists; return it and whether it is new.

        ``url`` is an fsspec URL for a FUSE-backed volume, with ``s3`` its
        connection settings (secret names, not keys). Asking for an existing
        volume with another URL raises AlreadyExists.
        """
        check_name(name)
        final = self.directory / name
        if final.is_dir():
            return self._existing(name, url), False
        temp = self.directory / f".new-{secrets.token_hex(8)}"
        created_at = time.time()
        temp.mkdir(mode=0o700)
        try:
            os.chown(temp, self.uid, self.uid)
            (temp / "data").mkdir(mode=0o755)
            os.chown(temp / "data", self.uid, self.uid)
            fields: dict[str, object] = {"name": name, "created_at": created_at}
            if url:
                fields["url"] = url
                fields["s3"] = s3 or {}
            metadata = json.dumps(fields)
            (temp / "volume.json").write_text(metadata + "\n")
            # The directory contains two entries, so renaming it onto an existing
            # volume fails (ENOTEMPTY or EEXIST) instead of replacing it.
            os.rename(temp, final)
        except OSError as error:
            shutil.rmtree(temp, ignore_errors=True)
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return self._existing(name, url), False
            raise
        logger.info("created volume %s", name)
        return VolumeInfo(name=name, created_at=created_at, url=url), True

    def _existing(self, name: str, url: str) -> VolumeInfo:
        info = self.get(name)
        if url and info.url != url:
            raise AlreadyExists(
                f"volume {name!r} exists with backend {info.url or 'local'!r}, not"
                f" {url!r}; delete it first or choose another name"
            )
        return info

    def metadata(self, name: str) -> dict[str, object]:
        """Return the contents of volume ``name``'s volume.json."""
        check_name(name)
        try:
            text = (self.directory / name / "volume.json").read_text()
        except FileNotFoundError:
            raise self._not_found(name) from None
        return json.loads(text)

    def get(self, name: str) -> VolumeInfo:
        """Return volume ``name`` without its usage."""
        fields = self.metadata(name)
        return VolumeInfo(
            name=name,
            created_at=float(fields["created_at"]),  # type: ignore[arg-type]
            url=str(fields.get("url", "")),
        )

    def list(self) -> list[VolumeInfo]:
        """Return every volume with its usage, in name order."""
        volumes = []
        for name in sorted(os.listdir(self.directory)):
            if not _NAME.fullmatch(name):
                continue
            try:
                info = self.get(name)
                # A FUSE-backed volume's usage would take a walk of the bucket.
                size, count = self.usage(name) if not info.url else (None, None)
            except NotFound:
                # Deleted while this listing ran.
                continue
            volumes.append(
                VolumeInfo(
                    name=name,
                    created_at=info.created_at,
                    size_bytes=size,
                    file_count=count,
                    url=info.url,
                )
            )
        return volumes

    def usage(self, name: str) -> tuple[int, int]:
        """Return the bytes and the number of regular files of volume ``name``."""
        seen: set[tuple[int, int]] = set()
        size = 0
        with self.root(name) as root:
            for _, status in self._walk(root, None):
                if not stat.S_ISREG(status.st_mode):
                    continue
                key = (status.st_dev, status.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                size += status.st_size
        return size, len(seen)

    def data_path(self, name: str) -> Path:
        """Return the host directory of volume ``name``, the source to bind-mount."""
        check_name(name)
        return self.directory / name / "data"

    def detach(self, name: str) -> Path:
        """Rename volume ``name`` out of the way and return where it went.

        After this call no new sandbox or API call finds the volume, and
        ``purge`` removes its files.
        """
        check_name(name)
        trash = self.directory / f".deleted-{secrets.token_hex(8)}"
        try:
            os.rename(self.directory / name, trash)
        except FileNotFoundError:
            raise self._not_found(name) from None
        logger.info("deleting volume %s", name)
        return trash

    @staticmethod
    def purge(trash: Path) -> None:
        # shutil.rmtree uses its descriptor-based walk on Linux and never
        # follows a symlink, so a link that sandbox code left stays harmless.
        shutil.rmtree(trash)

    def delete(self, name: str) -> None:
        """Delete volume ``name`` and its files. See the class docstring."""
        self.purge(self.detach(name))

    @contextlib.contextmanager
    def root(self, name: str) -> Iterator[int]:
        """Open the root of volume ``name``; yield an O_PATH descriptor of it."""
        url = self.get(name).url
        if url:
            # The daemon stays out of FUSE mounts, so that a stalled server can
            # never block one of its threads.
            raise FailedPrecondition(
                f"volume {name!r} is backed by {url}; its files are reachable only"
                " inside sandboxes that mount it, or in the backend itself"
            )
        top = os.open(self.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = libc.openat2(
                top,
                f"{name}/data",
                os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                0,
                _NO_SYMLINKS,
            )
        except FileNotFoundError:
            raise self._not_found(name) from None
        finally:
            os.close(top)
        with _closing(fd):
            yield fd

    @staticmethod
    def _not_found(name: str) -> NotFound:
        return NotFound(
            f"volume {name!r} not found; create it with `engine volume create"
            f" {name}` or by mounting it in a sandbox"
        )

    # Paths inside a volume.

    @staticmethod
    def _open_parent(root: int, parts: list[str]) -> int:
        """Open the directory that contains ``parts``, resolved inside the volume."""
        parent = "/".join(parts[:-1]) or "."
        return libc.openat2(root, parent, _DIRECTORY, 0, _IN_VOLUME)

    def make_parents(self, root: int, parts: list[str]) -> int:
        """Create the directories ``parts`` as needed; return a descriptor of the last.

        New directories are owned by the volume's uid. Each step is opened from
        the root, so a symlink among ``parts`` resolves inside the volume.
        """
        current = libc.openat2(root, ".", _DIRECTORY, 0, _IN_VOLUME)
        try:
            for index, name in enumerate(parts):
                try:
                    os.mkdir(name, 0o755, dir_fd=current)
                except FileExistsError:
                    pass
                else:
                    os.chown(
                        name, self.uid, self.uid, dir_fd=current, follow_symlinks=False
                    )
                prefix = "/".join(parts[: index + 1])
                following = libc.openat2(root, prefix, _DIRECTORY, 0, _IN_VOLUME)
                os.close(current)
                current = following
        except BaseException:
            os.close(current)
            raise
        return current

    def stat_path(self, volume: str, path: str) -> PathInfo:
        """Return the info of ``path``; a symlink there is reported, not followed."""
        parts = split_path(path)
        display = "/".join(parts)
        with self.root(volume) as root, _translated(volume, display):
            if not parts:
                return _info("", os.stat(root))
            with _closing(self._open_parent(root, parts)) as parent:
                return self._stat_entry(parent, parts[-1], display)

    @staticmethod
    def _stat_entry(parent: int, name: str, display: str) -> PathInfo:
        status = os.stat(name, dir_fd=parent, follow_symlinks=False)
        target = ""
        if stat.S_ISLNK(status.st_mode):
            target = os.readlink(name, dir_fd=parent)
        return _info(display, status, target)

    def list_path(
        self, volume: str, pattern: str, limit: int = DEFAULT_LIST_LIMIT
    ) -> tuple[list[PathInfo], bool]:
        """Return the entries that ``pattern`` names and whether more were left off.

        Without glob characters, ``pattern`` is a path: a directory lists its
        entries, anything else lists itself. With them, it is a glob relative
        to the root (see ``glob_match``), and the result is every match in
        depth-first name order. Walks do not follow symlinks.
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidArgument(
                f"invalid limit {limit}: expected 1 to {MAX_LIST_LIMIT} entries"
            )
        parts = split_path(pattern, "pattern")
        entries: list[PathInfo] = []
        for entry in self._entries(volume, parts):
            if len(entries) == limit:
                return entries, True
            entries.append(entry)
        return entries, False

    def _entries(self, volume: str, parts: list[str]) -> Iterator[PathInfo]:
        if has_glob(parts):
            for display, status, target in self._glob(volume, parts):
                yield _info(display, status, target)
            return
        display = "/".join(parts)
        with self.root(volume) as root, _translated(volume, display):
            if parts:
                with _closing(self._open_parent(root, parts)) as parent:
                    entry = self._stat_entry(parent, parts[-1], display)
                if entry.type != PathType.DIRECTORY:
                    yield entry
                    return
            directory = libc.openat2(root, display or ".", _DIRECTORY, 0, _IN_VOLUME)
            with _closing(directory):
                for item in sorted(os.scandir(directory), key=lambda e: e.name):
                    status = item.stat(follow_symlinks=False)
                    target = ""
                    if stat.S_ISLNK(status.st_mode):
                        target = os.readlink(item.name, dir_fd=directory)
                    yield _info(_join(display, item.name), status, target)

    def _glob(
        self, volume: str, parts: list[str]
    ) -> Iterator[tuple[str, os.stat_result, str]]:
        """Yield (path, lstat result, symlink target) of each match of ``parts``."""
        literal = 0
        while not _GLOB_CHARACTERS & set(parts[literal]):
            literal += 1
        base = "/".join(parts[:literal])
        rest = parts[literal:]
        depth = None if "**" in rest else len(rest)
        with self.root(volume) as root, _translated(volume, base):
            try:
                start = libc.openat2(root, base or ".", _DIRECTORY, 0, _IN_VOLUME)
            except (FileNotFoundError, NotADirectoryError):
                return
            with _closing(start):
                # "dir/**" matches "dir" itself, which the walk below omits.
                if base and glob_match(rest, []):
                    name = parts[literal - 1]
                    with _closing(self._open_parent(root, parts[:literal])) as parent:
                        status = os.stat(name, dir_fd=parent, follow_symlinks=False)
                        target = ""
                        if stat.S_ISLNK(status.st_mode):
                            target = os.readlink(name, dir_fd=parent)
                    yield base, status, target
                for relative, status in self._walk(start, depth):
                    if not glob_match(rest, relative.split("/")):
                        continue
                    target = ""
                    if stat.S_ISLNK(status.st_mode):
                        with contextlib.suppress(OSError):
                            target = self._readlink(start, relative)
                    yield _join(base, relative), status, target

    @staticmethod
    def _readlink(start: int, relative: str) -> str:
        head, _, name = relative.rpartition("/")
        with _closing(
            libc.openat2(start, head or ".", _DIRECTORY, 0, _NO_SYMLINKS)
        ) as fd:
            return os.readlink(name, dir_fd=fd)

    @staticmethod
    def _walk(start: int, depth: int | None) -> Iterator[tuple[str, os.stat_result]]:
        """Yield (path relative to ``start``, lstat result) below ``start``.

        The order is depth-first by name, and ``depth`` limits how many
        components a yielded path has. Each directory is opened again from
        ``start`` with RESOLVE_NO_SYMLINKS, so the walk never follows a symlink,
        keeps one directory descriptor open at a time, and skips a directory that
        sandbox code replaced or removed meanwhile.
        """
        pending = [("", 0)]
        while pending:
            relative, level = pending.pop()
            try:
                fd = libc.openat2(start, relative or ".", _DIRECTORY, 0, _NO_SYMLINKS)
            except OSError as error:
                logger.debug("skipping %r in a volume walk: %s", relative, error)
                continue
            children = []
            with _closing(fd):
                for item in sorted(os.scandir(fd), key=lambda item: item.name):
                    try:
                        children.append((item.name, item.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue
            subdirectories = []
            for name, status in children:
                path = _join(relative, name)
                yield path, status
                if stat.S_ISDIR(status.st_mode) and (
                    depth is None or level + 1 < depth
                ):
                    subdirectories.append((path, level + 1))
            pending.extend(reversed(subdirectories))

    def _destination(
        self, root: int, source: list[str], path: str
    ) -> tuple[int, str, str]:
        """Return (parent descriptor, name, display path) of a move or copy target.

        As with mv(1) and cp(1), a destination that is a directory receives the
        source under its own name, and one that ends in "/" must be one.
        """
        destination = split_path(path, "destination")
        display = "/".join(destination)
        try:
            directory = libc.openat2(root, display or ".", _DIRECTORY, 0, _IN_VOLUME)
        except (FileNotFoundError, NotADirectoryError):
            if not destination or path.endswith("/"):
                raise
            return self._open_parent(root, destination), destination[-1], display
        return directory, source[-1], _join(display, source[-1])

    def _source(self, volume: str, path: str, verb: str) -> list[str]:
        parts = split_path(path, "source")
        if not parts:
            raise InvalidArgument(
                f"invalid source {path!r}: cannot {verb} the root of volume {volume!r}"
            )
        return parts

    def move_path(self, volume: str, source: str, destination: str) -> PathInfo:
        """Rename ``source`` to ``destination`` within the volume; return the result."""
        parts = self._source(volume, source, "move")
        target = "/".join(split_path(destination, "destination"))
        display = "/".join(parts)
        with (
            self.root(volume) as root,
            _translated(volume, display),
            _closing(self._open_parent(root, parts)) as parent,
        ):
            with _translated(volume, target):
                where, name, result = self._destination(root, parts, destination)
            with _closing(where):
                os.rename(parts[-1], name, src_dir_fd=parent, dst_dir_fd=where)
                return self._stat_entry(where, name, result)

    def copy_path(self, volume: str, source: str, destination: str) -> PathInfo:
        """Copy a file, symlink or directory tree within the volume; return the copy.

        The copy is built under a temporary name and renamed into place, and
        every copied entry is owned by the volume's uid. Symlinks are copied
        as symlinks. FIFOs, sockets and device nodes inside a tree are skipped.
        """
        parts = self._source(volume, source, "copy")
        target = "/".join(split_path(destination, "destination"))
        display = "/".join(parts)
        with (
            self.root(volume) as root,
            _translated(volume, display),
            _closing(self._open_parent(root, parts)) as parent,
        ):
            status = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            if not (
                stat.S_ISREG(status.st_mode)
                or stat.S_ISDIR(status.st_mode)
                or stat.S_ISLNK(status.st_mode)
            ):
                raise InvalidArgument(
                    f"/{display} in volume {volume!r} is not a file, directory"
                    " or symlink; only those can be copied"
                )
            with _translated(volume, target):
                where, name, result = self._destination(root, parts, destination)
            with _closing(where):
                temp = f"{TEMP_PREFIX}copy-{secrets.token_hex(8)}"
                try:
                    self._copy_entry(parent, parts[-1], status, where, temp)
                    os.rename(temp, name, src_dir_fd=where, dst_dir_fd=where)
                except BaseException:
                    self._remove_entry(where, temp)
                    raise
                return self._stat_entry(where, name, result)

    def _copy_entry(
        self,
        source_dir: int,
        name: str,
        status: os.stat_result,
        target_dir: int,
        target: str,
    ) -> None:
        if stat.S_ISLNK(status.st_mode):
            os.symlink(os.readlink(name, dir_fd=source_dir), target, dir_fd=target_dir)
            os.chown(
                target, self.uid, self.uid, dir_fd=target_dir, follow_symlinks=False
            )
        elif stat.S_ISREG(status.st_mode):
            self._copy_file(source_dir, name, target_dir, target, status.st_mode)
        else:
            self._copy_tree(source_dir, name, status, target_dir, target)

    def _copy_file(
        self, source_dir: int, name: str, target_dir: int, target: str, mode: int
    ) -> None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        with _closing(libc.openat2(source_dir, name, flags, 0, _NO_SYMLINKS)) as reader:
            if not stat.S_ISREG(os.fstat(reader).st_mode):
                raise OSError(errno.EINVAL, f"{name!r} changed while being copied")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with _closing(os.open(target, flags, 0o600, dir_fd=target_dir)) as writer:
                _copy_data(reader, writer)
                os.fchown(writer, self.uid, self.uid)
                os.fchmod(writer, stat.S_IMODE(mode) & 0o1777)

    def _copy_tree(
        self,
        source_dir: int,
        name: str,
        status: os.stat_result,
        target_dir: int,
        target: str,
    ) -> None:
        """Copy a directory tree, one directory descriptor pair at a time."""
        self._make_directory(target_dir, target, status.st_mode)
        with contextlib.ExitStack() as stack:
            source_top = libc.openat2(source_dir, name, _DIRECTORY, 0, _NO_SYMLINKS)
            stack.callback(os.close, source_top)
            target_top = libc.openat2(target_dir, target, _DIRECTORY, 0, _NO_SYMLINKS)
            stack.callback(os.close, target_top)
            # Directories this copy made: a destination inside the source shows
            # up in the walk, and copying it again would never end.
            created = {_inode(os.fstat(target_top))}
            pending = [""]
            while pending:
                relative = pending.pop()
                current = relative or "."
                with (
                    _closing(
                        libc.openat2(source_top, current, _DIRECTORY, 0, _NO_SYMLINKS)
                    ) as source,
                    _closing(
                        libc.openat2(target_top, current, _DIRECTORY, 0, _NO_SYMLINKS)
                    ) as copy,
                ):
                    for item in sorted(os.scandir(source), key=lambda e: e.name):
                        entry = item.stat(follow_symlinks=False)
                        if _inode(entry) in created:
                            continue
                        if stat.S_ISDIR(entry.st_mode):
                            self._make_directory(copy, item.name, entry.st_mode)
                            created.add(
                                _inode(
                                    os.stat(
                                        item.name, dir_fd=copy, follow_symlinks=False
                                    )
                                )
                            )
                            pending.append(_join(relative, item.name))
                        elif stat.S_ISREG(entry.st_mode) or stat.S_ISLNK(entry.st_mode):
                            self._copy_entry(source, item.name, entry, copy, item.name)
                        else:
                            logger.info(
                                "copy skips %s: not a file, directory or symlink",
                                _join(relative, item.name),
                            )

    def _make_directory(self, parent: int, name: str, mode: int) -> None:
        os.mkdir(name, 0o700, dir_fd=parent)
        os.chown(name, self.uid, self.uid, dir_fd=parent, follow_symlinks=False)
        os.chmod(
            name, stat.S_IMODE(mode) & 0o1777, dir_fd=parent, follow_symlinks=False
        )

    @staticmethod
    def _remove_entry(parent: int, name: str) -> None:
        """Remove ``name`` in ``parent``: a directory with its contents, or a link."""
        try:
            status = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(status.st_mode):
            # With dir_fd, rmtree walks by descriptor and never follows a symlink.
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)

    def delete_path(self, volume: str, pattern: str) -> list[str]:
        """Delete what ``pattern`` names (a path or a glob); return the paths deleted.

        Directories are deleted with their contents, and a symlink is deleted,
        never what it points to. Raises NotFound when nothing matches.
        """
        parts = split_path(pattern, "pattern")
        if not parts:
            raise InvalidArgument(
                f"invalid pattern {pattern!r}: it names the root of volume"
                f" {volume!r}. Delete the volume itself, or its contents with '*'"
            )
        if has_glob(parts):
            matches = [display for display, _, _ in self._glob(volume, parts)]
        else:
            matches = ["/".join(parts)]
        deleted: list[str] = []
        with self.root(volume) as root:
            for display in matches:
                # Matches come in depth-first order, so the paths below a
                # deleted directory follow it, and its removal took them.
                if deleted and display.startswith(deleted[-1] + "/"):
                    continue
                target = display.split("/")
                with (
                    _translated(volume, display),
                    _closing(self._open_parent(root, target)) as parent,
                ):
                    os.stat(target[-1], dir_fd=parent, follow_symlinks=False)
                    self._remove_entry(parent, target[-1])
                deleted.append(display)
        if not deleted:
            raise NotFound(f"no path in volume {volume!r} matches {pattern!r}")
        logger.info("deleted %d paths in volume %s", len(deleted), volume)
        return deleted

    def open_upload(self, volume: str, path: str, mode: int = 0o644) -> Upload:
        return Upload(self, volume, path, mode)

    def open_download(self, volume: str, path: str) -> Download:
        return Download(self, volume, path)


def _copy_data(reader: int, writer: int) -> None:
    """Copy ``reader`` to its end into ``writer``, in the kernel where it can."""
    try:
        while os.copy_file_range(reader, writer, CHUNK_BYTES):
            pass
        return
    except OSError as error:
        if error.errno not in (
            errno.EXDEV,
            errno.EINVAL,
            errno.ENOSYS,
            errno.EOPNOTSUPP,
        ):
            raise
    # copy_file_range fails before it copies anything on file systems that
    # lack it, so the offsets are still at the start.
    while data := os.read(reader, CHUNK_BYTES):
        view = memoryview(data)
        while view:
            view = view[os.write(writer, view) :]


def _inode(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino
