"""File operations inside a sandbox, run by a worker that PID 1 forks.

The worker has the sandbox's root, namespaces, capabilities and seccomp
filter, so paths resolve exactly as the sandbox sees them: ``..`` stops at the
sandbox's root, absolute symlinks point inside it, and a symlink swapped
during the operation can only lead to another path of the same sandbox. The
worker can write only what sandbox code could write.

The worker writes one JSON line to the result descriptor, then, for a read,
streams the file's bytes to the data descriptor:

    {"ok": true, ...}                                 on success
    {"ok": false, "errno": N, "message": "..."}       on failure
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

CHUNK_BYTES = 1024 * 1024
# find_in_files stops after this many matches and reports truncated.
MAX_MATCHES = 10_000
# find and replace skip files larger than this (bytes).
MAX_SEARCH_FILE_BYTES = 64 * 1024 * 1024
# list_files stops after this many entries and reports truncated.
MAX_ENTRIES = 100_000
# list_files and find_in_files also stop, and report truncated, once the paths
# and texts they return add up to this many bytes. The result travels as one
# JSON line, which the Engine reads with a 64 MiB limit.
MAX_RESULT_BYTES = 16 * 1024 * 1024
# Seconds that find_in_files and replace_in_files may spend on one tree.
MAX_SEARCH_SECONDS = 10.0
# Kernel pseudo file systems that tree walks do not descend into: procfs and
# sysfs hold endless or blocking files and no file of the sandbox's own.
PSEUDO_FILE_SYSTEMS = ("/proc", "/sys")
# find_in_files returns at most this many bytes of a matching line, cut around
# the match.
MAX_MATCH_TEXT_BYTES = 512
# Length prefix of each chunk that write_file receives (see _receive).
FRAME_HEADER = struct.Struct("<Q")
# Error messages show at most this many characters of a path.
MAX_SHOWN_PATH_CHARS = 120
# linkat(2) flag from <fcntl.h>.
AT_EMPTY_PATH = 0x1000
# f_type values of statfs(2), from <linux/magic.h>: the file systems that the
# sandbox's root and /tmp use, which are deleted with the sandbox.
SANDBOX_LIFETIME_FILE_SYSTEMS = frozenset({0x794C7630, 0x01021994})  # overlay, tmpfs
# sizeof(struct statfs) on 64-bit Linux is 120 bytes; f_type is its first long.
STATFS_BYTES = 128

_libc = ctypes.CDLL(None, use_errno=True)


def run(action: str, args: dict[str, Any], result_fd: int, data_fd: int | None) -> int:
    """Run one action and report it; return the worker's exit status."""
    handler = _ACTIONS.get(action)
    try:
        if handler is None:
            raise OSError(errno.EINVAL, f"unknown file action {action!r}")
        result = handler(args, data_fd, result_fd)
    except OSError as error:
        _report(
            result_fd,
            {
                "ok": False,
                "errno": error.errno or errno.EIO,
                "message": _message(error),
            },
        )
        return 1
    except (re.error, ValueError) as error:
        _report(result_fd, {"ok": False, "errno": errno.EINVAL, "message": str(error)})
        return 1
    if result is not None:
        _report(result_fd, {"ok": True, **result})
    return 0


def _report(fd: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _message(error: OSError) -> str:
    reason = error.strerror or str(error)
    if error.filename is None:
        return reason
    path = os.fsdecode(error.filename)
    if len(path) > MAX_SHOWN_PATH_CHARS:
        shown = f"{path[:MAX_SHOWN_PATH_CHARS]!r}... ({len(path)} characters)"
    else:
        shown = repr(path)
    return f"{shown}: {reason}"


def _path(args: dict[str, Any], key: str = "path") -> bytes:
    """Return a request path as bytes; non-UTF-8 names travel as surrogate escapes."""
    value = args[key]
    if not isinstance(value, str) or not value:
        raise OSError(errno.EINVAL, f"{key} must be a non-empty path")
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise OSError(errno.EINVAL, f"{key} contains a NUL byte")
    return raw


def _info(path: bytes, name: bytes | None = None) -> dict[str, Any]:
    status = os.lstat(path)
    is_link = stat.S_ISLNK(status.st_mode)
    return {
        "path": os.fsdecode(path),
        "name": os.fsdecode(
            name if name is not None else os.path.basename(path) or path
        ),
        "size": status.st_size,
        "mode": stat.S_IMODE(status.st_mode),
        "type": _kind(status.st_mode),
        "mtime": status.st_mtime,
        "uid": status.st_uid,
        "gid": status.st_gid,
        "target": os.fsdecode(os.readlink(path)) if is_link else "",
    }


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def write_file(args: dict[str, Any], data_fd: int | None, _: int) -> dict[str, Any]:
    """Write the data descriptor's bytes to ``path`` atomically, with ``mode``.

    The bytes go to a file without a name (O_TMPFILE) in the same directory,
    or, where the file system or kernel does not support that, to a hidden
    file named by the ``temporary`` argument. Only a complete file gets a name
    and is renamed over ``path``, so a reader sees the old file or the new one,
    never a part, and an unnamed file vanishes with a worker that is killed
    mid-way, for example by the OOM killer. With ``overwrite`` false, the new
    file is linked to ``path`` instead, which fails with EEXIST when ``path``
    exists.
    """
    path = _path(args)
    mode = int(args.get("mode", 0o644))
    if not 0 <= mode <= 0o7777:
        raise OSError(errno.EINVAL, f"mode {mode:#o} is not a valid file mode")
    if data_fd is None:
        raise OSError(errno.EINVAL, "write_file needs a data descriptor")
    directory, name = os.path.split(path)
    if args.get("parents"):
        _make_parents(directory)
    if not name or os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    _check_name_length(path)
    temporary = _temporary_name(args, "temporary")
    # Every step below is relative to this descriptor, so replacing a
    # directory of the path by a symlink mid-way cannot move the target.
    try:
        directory_fd = os.open(
            directory or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        )
    except OSError as error:
        reason = f"{error.strerror} (parent directory {os.fsdecode(directory)!r})"
        if error.errno == errno.ENOENT:
            reason += "; set parents to create it"
        raise OSError(error.errno, reason, path) from None
    try:
        return _write_in(directory_fd, name, temporary, data_fd, mode, args, path)
    finally:
        os.close(directory_fd)


def _write_in(
    directory_fd: int,
    name: bytes,
    temporary: bytes,
    data_fd: int,
    mode: int,
    args: dict[str, Any],
    path: bytes,
) -> dict[str, Any]:
    try:
        fd, anonymous = _create_temporary(directory_fd, temporary)
    except OSError as error:
        # Name the path the caller asked for, not the temporary file.
        raise OSError(error.errno, error.strerror, path) from None
    named = not anonymous
    at = {"src_dir_fd": directory_fd, "dst_dir_fd": directory_fd}
    try:
        size = _receive(data_fd, fd)
        os.fchmod(fd, mode)
        _sync_if_durable(fd)
        if not args.get("overwrite", True):
            if anonymous:
                _link_anonymous(fd, directory_fd, name)
            else:
                os.link(temporary, name, **at, follow_symlinks=False)
        else:
            if anonymous:
                _link_anonymous(fd, directory_fd, temporary)
                named = True
            os.rename(temporary, name, **at)
            named = False
    except BaseException as error:
        if named:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory_fd)
        if isinstance(error, OSError):
            # ENOSPC from write(2) names no file; name the requested path.
            raise OSError(error.errno, error.strerror, path) from None
        raise
    finally:
        os.close(fd)
    if named:
        os.unlink(temporary, dir_fd=directory_fd)
    return {"size": size}


def _create_temporary(directory_fd: int, temporary: bytes) -> tuple[int, bool]:
    """Open a file to write in the directory; return it and whether it is unnamed.

    An unnamed file can get a name only through linkat(2) with AT_EMPTY_PATH,
    which older kernels allow only with CAP_DAC_READ_SEARCH in the initial
    user namespace. A throwaway unnamed file tests that first, because the
    test link uses up the file's one chance to be linked.
    """
    flags = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
    try:
        probe = os.open(".", flags, 0o600, dir_fd=directory_fd)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    else:
        try:
            _link_anonymous(probe, directory_fd, temporary)
        except OSError:
            linkable = False
        else:
            linkable = True
            os.unlink(temporary, dir_fd=directory_fd)
        finally:
            os.close(probe)
        if linkable:
            return os.open(".", flags, 0o600, dir_fd=directory_fd), True
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(temporary, flags, 0o600, dir_fd=directory_fd), False


def _link_anonymous(fd: int, directory_fd: int, name: bytes) -> None:
    """Link the unnamed file ``fd`` as ``name``: linkat(2) with AT_EMPTY_PATH.

    os.link cannot pass AT_EMPTY_PATH, and linking /proc/self/fd/N fails with
    EXDEV inside the sandbox, so this calls libc directly.
    """
    if _libc.linkat(fd, b"", directory_fd, name, AT_EMPTY_PATH) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), name)


def _sync_if_durable(fd: int) -> None:
    """fsync ``fd`` before its rename, unless its file dies with the sandbox.

    The sandbox's root overlay and its tmpfs mounts are deleted with the
    sandbox and not kept across a daemon restart, so syncing them only costs
    time. Other file systems, such as bind-mounted volumes, outlive it, and
    there the sync keeps a crash from leaving an empty file under the new
    name.

    NOTE: the check is by file system type, so a volume whose host directory
    is itself on overlayfs or tmpfs (a data dir inside a container) is not
    synced either.
    """
    buffer = ctypes.create_string_buffer(STATFS_BYTES)
    if _libc.fstatfs(fd, buffer) != 0:
        os.fsync(fd)
        return
    file_system = int.from_bytes(buffer.raw[:8], sys.byteorder)
    if file_system not in SANDBOX_LIFETIME_FILE_SYSTEMS:
        os.fsync(fd)


def _temporary_name(args: dict[str, Any], key: str) -> bytes:
    name = args.get(key) or f".engine-{os.urandom(6).hex()}"
    raw = os.fsencode(name)
    if b"/" in raw or b"\0" in raw or raw in (b".", b".."):
        raise OSError(errno.EINVAL, f"{key} {name!r} is not a file name")
    return raw


def _check_name_length(path: bytes) -> None:
    """Raise ENAMETOOLONG before any data is written, not at the final rename."""
    name = os.path.basename(path)
    try:
        limit = os.pathconf(os.path.dirname(path) or b".", "PC_NAME_MAX")
    except OSError:
        return
    if len(name) > limit:
        raise OSError(
            errno.ENAMETOOLONG,
            f"File name too long: {len(name)} bytes, the maximum is {limit}",
            path,
        )


def _receive(source: int, destination: int) -> int:
    """Copy the frames of the pipe ``source`` to ``destination``; return the size.

    The Engine sends each chunk as an 8-byte little-endian length followed by
    that many bytes, and a zero length after the last one. Only that end
    frame commits the file: a pipe that closes before it, as when the upload
    is cancelled or the daemon dies, raises ECANCELED, so a partial upload
    never gets a name, however late the worker is killed.
    """
    size = 0
    splice = True
    while True:
        header = _read_exactly(source, FRAME_HEADER.size)
        (length,) = FRAME_HEADER.unpack(header)
        if length == 0:
            return size
        remaining = length
        while remaining and splice:
            try:
                moved = os.splice(source, destination, remaining)
            except OSError as error:
                # splice(2) needs the destination's file system to support it.
                if error.errno != errno.EINVAL:
                    raise
                splice = False
                break
            if moved == 0:
                raise _cancelled()
            remaining -= moved
        if remaining:
            _write_all(destination, _read_exactly(source, remaining))
        size += length


def _read_exactly(fd: int, count: int) -> bytes:
    parts = []
    while count:
        data = os.read(fd, min(count, CHUNK_BYTES))
        if not data:
            raise _cancelled()
        parts.append(data)
        count -= len(data)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _cancelled() -> OSError:
    return OSError(
        errno.ECANCELED, "the data ended before its end frame; nothing was written"
    )


def read_file(args: dict[str, Any], data_fd: int | None, result_fd: int) -> None:
    """Report the file's size and mode, then send exactly that many bytes.

    A file that shrinks while it is sent makes the worker stop early, and the
    Engine, which counts the bytes, reports the short read. Bytes appended
    after the open are not sent.
    """
    path = _path(args)
    if data_fd is None:
        raise OSError(errno.EINVAL, "read_file needs a data descriptor")
    # O_NONBLOCK keeps a FIFO planted at the path from blocking the open.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        _report(
            result_fd,
            {"ok": True, "size": status.st_size, "mode": stat.S_IMODE(status.st_mode)},
        )
        remaining = status.st_size
        while remaining > 0:
            sent = os.sendfile(data_fd, fd, None, min(remaining, CHUNK_BYTES))
            if sent == 0:
                return
            remaining -= sent
    finally:
        os.close(fd)


def stat_file(args: dict[str, Any], *_: object) -> dict[str, Any]:
    return {"info": _info(_path(args))}


def list_files(args: dict[str, Any], *_: object) -> dict[str, Any]:
    """List a directory, or with ``recursive`` its whole tree, depth first.

    Stops and reports truncated after MAX_ENTRIES entries or MAX_RESULT_BYTES
    of paths.
    """
    path = _path(args)
    entries: list[dict[str, Any]] = []
    result_bytes = 0
    for entry_path, name in _walk(path, bool(args.get("recursive"))):
        if len(entries) >= MAX_ENTRIES or result_bytes >= MAX_RESULT_BYTES:
            return {"entries": entries, "truncated": True}
        try:
            info = _info(entry_path, name)
        except FileNotFoundError:
            continue
        entries.append(info)
        result_bytes += len(entry_path) + len(info["target"]) + 100
    return {"entries": entries, "truncated": False}


def _walk(
    path: bytes, recursive: bool, skip_devices: frozenset[int] = frozenset()
) -> Iterator[tuple[bytes, bytes]]:
    """Yield (path, name) of each entry, sorted by name, each directory before its tree.

    Symlinks to directories are listed but not descended into, and neither are
    subdirectories that cannot be read or whose file system is in
    ``skip_devices``.
    """
    # os.stat raises FileNotFoundError for a missing path, which isdir hides.
    if not stat.S_ISDIR(os.stat(path).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
    with os.scandir(path) as scan:
        top = sorted(scan, key=lambda entry: entry.name)
    stack = [iter(top)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        yield entry.path, entry.name
        if recursive and entry.is_dir(follow_symlinks=False):
            try:
                if entry.stat(follow_symlinks=False).st_dev in skip_devices:
                    continue
                with os.scandir(entry.path) as scan:
                    children = sorted(scan, key=lambda child: child.name)
            except (PermissionError, FileNotFoundError, NotADirectoryError):
                continue
            stack.append(iter(children))


def _make_parents(path: bytes) -> None:
    """Create ``path`` and its missing parents with mode 0o755, one level at a time.

    os.makedirs recurses once per missing level, so a deep path would end in
    RecursionError instead of an errno.
    """
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise NotADirectoryError(
                    errno.ENOTDIR, "Not a directory", directory
                ) from None


def make_directory(args: dict[str, Any], *_: object) -> dict[str, Any]:
    """Create a directory with exactly ``mode``.

    With ``parents``, missing parents are created with mode 0o755, and an
    existing directory is kept unchanged, mode included, as ``mkdir -p`` does.
    """
    path = _path(args).rstrip(b"/") or b"/"
    mode = int(args.get("mode", 0o755))
    if not 0 <= mode <= 0o7777:
        raise OSError(errno.EINVAL, f"mode {mode:#o} is not a valid file mode")
    parents = bool(args.get("parents", True))
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not parents or not os.path.isdir(path):
            raise
        return {"info": _info(path)}
    except FileNotFoundError:
        if not parents:
            raise
        _make_parents(os.path.dirname(path))
        os.mkdir(path, mode)
    # mkdir(2) applies the umask, so set the requested bits exactly.
    os.chmod(path, mode)
    return {"info": _info(path)}


def delete_file(args: dict[str, Any], *_: object) -> dict[str, Any]:
    path = _path(args)
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(
            errno.EISDIR, "Is a directory; use delete_directory", path
        )
    os.unlink(path)
    return {}


def delete_directory(args: dict[str, Any], *_: object) -> dict[str, Any]:
    path = _path(args)
    if os.path.realpath(path) == b"/":
        raise OSError(errno.EBUSY, "the sandbox's root cannot be deleted", path)
    if not args.get("recursive"):
        os.rmdir(path)
        return {}
    if os.path.islink(path) or not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
    _remove_tree(path)
    return {}


def _remove_tree(path: bytes) -> None:
    # Descends without following symlinks and by descriptor, so a directory
    # swapped for a symlink mid-way is unlinked, not followed.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _remove_children(fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def _remove_children(directory_fd: int) -> None:
    for name in os.listdir(directory_fd):
        raw = os.fsencode(name)
        try:
            child = os.open(
                raw,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=directory_fd,
            )
        except (NotADirectoryError, OSError) as error:
            if isinstance(error, NotADirectoryError) or error.errno == errno.ELOOP:
                os.unlink(raw, dir_fd=directory_fd)
                continue
            raise
        try:
            _remove_children(child)
        finally:
            os.close(child)
        os.rmdir(raw, dir_fd=directory_fd)


def move(args: dict[str, Any], *_: object) -> dict[str, Any]:
    source = _path(args, "source")
    destination = _path(args, "destination")
    if not args.get("overwrite", True) and os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, "File exists", destination)
    os.rename(source, destination)
    return {"info": _info(destination)}


def chmod(args: dict[str, Any], *_: object) -> dict[str, Any]:
    path = _path(args)
    mode = int(args["mode"])
    if not 0 <= mode <= 0o7777:
        raise OSError(errno.EINVAL, f"mode {mode:#o} is not a valid file mode")
    os.chmod(path, mode)
    return {"info": _info(path)}


def _regular_files(path: bytes) -> Iterator[bytes]:
    """Yield ``path`` if it is a regular file, else the regular files in its tree.

    Files in the tree larger than MAX_SEARCH_FILE_BYTES are skipped. A symlink
    given as ``path`` yields the file it points to.
    """
    if os.path.isfile(path):
        yield os.path.realpath(path)
        return
    for entry_path, _ in _walk(
        path, recursive=True, skip_devices=_pseudo_devices(path)
    ):
        try:
            status = os.lstat(entry_path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(status.st_mode) and status.st_size <= MAX_SEARCH_FILE_BYTES:
            yield entry_path


def _pseudo_devices(start: bytes) -> frozenset[int]:
    """Return the devices of mounted PSEUDO_FILE_SYSTEMS other than ``start``'s."""
    root = os.stat("/").st_dev
    devices = set()
    for name in PSEUDO_FILE_SYSTEMS:
        with contextlib.suppress(OSError):
            devices.add(os.stat(name).st_dev)
    return frozenset(devices - {root, os.stat(start).st_dev})


def _open_regular(path: bytes) -> int:
    """Open ``path`` for reading, raising EINVAL unless it is a regular file.

    O_NONBLOCK keeps a FIFO swapped in after the walk from blocking the open.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    os.set_blocking(fd, True)
    return fd


def find_in_files(args: dict[str, Any], *_: object) -> dict[str, Any]:
    """Search the lines of the files under ``path`` for ``pattern``.

    Files whose first 8 KiB contain a NUL byte count as binary and are
    skipped, and so are files that cannot be read. Stops and reports
    truncated after ``max_matches`` matches, MAX_RESULT_BYTES of results or
    MAX_SEARCH_SECONDS.
    """
    pattern = re.compile(os.fsencode(args["pattern"]))
    limit = min(int(args.get("max_matches", MAX_MATCHES)), MAX_MATCHES)
    matches: list[dict[str, Any]] = []
    result_bytes = 0
    deadline = time.monotonic() + MAX_SEARCH_SECONDS
    for path in _regular_files(_path(args)):
        if time.monotonic() > deadline:
            return {"matches": matches, "truncated": True}
        try:
            for number, line in _lines(path):
                for match in pattern.finditer(line):
                    if len(matches) >= limit or result_bytes >= MAX_RESULT_BYTES:
                        return {"matches": matches, "truncated": True}
                    text = _excerpt(line, match.start())
                    matches.append(
                        {
                            "path": os.fsdecode(path),
                            "line": number,
                            "column": match.start() + 1,
                            "text": text,
                        }
                    )
                    result_bytes += len(path) + len(text) + 50
        except (PermissionError, FileNotFoundError, IsADirectoryError):
            continue
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
    return {"matches": matches, "truncated": False}


def _lines(path: bytes) -> Iterator[tuple[int, bytes]]:
    with open(_open_regular(path), "rb") as file:
        head = file.read(8192)
        if b"\0" in head:
            return
        file.seek(0)
        yield from enumerate(file, start=1)


def _excerpt(line: bytes, start: int) -> str:
    """Return ``line`` without its newline, at most MAX_MATCH_TEXT_BYTES of it.

    A longer line is cut to a part that contains ``start``.
    """
    line = line.rstrip(b"\r\n")
    if len(line) > MAX_MATCH_TEXT_BYTES:
        begin = start - MAX_MATCH_TEXT_BYTES // 4
        begin = max(0, min(begin, len(line) - MAX_MATCH_TEXT_BYTES))
        line = line[begin : begin + MAX_MATCH_TEXT_BYTES]
    return line.decode(errors="replace")


def replace_in_files(args: dict[str, Any], *_: object) -> dict[str, Any]:
    """Replace ``pattern`` by ``replacement`` in files under ``path``.

    Only files that match are rewritten, each atomically through a temporary
    file that keeps the original's mode and owner, so files that do not match
    keep their inode and mtime. Binary and unreadable files are skipped, as in
    find_in_files. The first file that cannot be rewritten stops the walk with
    its error, and the files changed before it stay changed. So does running
    past MAX_SEARCH_SECONDS, with ETIMEDOUT.
    """
    pattern = re.compile(os.fsencode(args["pattern"]))
    replacement = os.fsencode(args["replacement"])
    changed: list[str] = []
    deadline = time.monotonic() + MAX_SEARCH_SECONDS
    for path in _regular_files(_path(args)):
        if time.monotonic() > deadline:
            raise OSError(
                errno.ETIMEDOUT,
                f"replace_in_files stopped after {MAX_SEARCH_SECONDS:g} s, with"
                f" {len(changed)} files changed; pass a smaller tree",
            )
        try:
            with open(_open_regular(path), "rb") as file:
                content = file.read()
        except (PermissionError, FileNotFoundError):
            continue
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            continue
        if b"\0" in content[:8192]:
            continue
        new, count = pattern.subn(replacement, content)
        if count == 0:
            continue
        _rewrite(path, new)
        changed.append(os.fsdecode(path))
    return {"changed": changed}


def _rewrite(path: bytes, content: bytes) -> None:
    status = os.lstat(path)
    directory = os.path.dirname(path) or b"."
    temporary = os.path.join(
        directory, b".engine-replace-" + os.urandom(6).hex().encode()
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        # fchown clears the set-user-ID and set-group-ID bits, so fchmod follows it.
        os.fchown(fd, status.st_uid, status.st_gid)
        os.fchmod(fd, stat.S_IMODE(status.st_mode))
        _sync_if_durable(fd)
    except BaseException as error:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, path) from None
        raise
    os.close(fd)
    os.rename(temporary, path)


_ACTIONS: dict[
    str, Callable[[dict[str, Any], int | None, int], dict[str, Any] | None]
] = {
    "write_file": write_file,
    "read_file": read_file,
    "stat_file": stat_file,
    "list_files": list_files,
    "make_directory": make_directory,
    "delete_file": delete_file,
    "delete_directory": delete_directory,
    "move": move,
    "chmod": chmod,
    "find_in_files": find_in_files,
    "replace_in_files": replace_in_files,
}
