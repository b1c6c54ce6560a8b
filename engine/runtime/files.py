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
import errno
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from typing import Any

CHUNK_BYTES = 1024 * 1024
# find_in_files stops after this many matches and reports truncated.
MAX_MATCHES = 10_000
# find and replace skip files larger than this (bytes).
MAX_SEARCH_FILE_BYTES = 64 * 1024 * 1024
# list_files stops after this many entries and reports truncated.
MAX_ENTRIES = 100_000


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
    if error.filename is not None:
        return f"{os.fsdecode(error.filename)!r}: {reason}"
    return reason


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

    The bytes go to a temporary file in the same directory, which is renamed
    over the target only when complete, so a reader sees the old file or the
    new one, never a part.
    """
    path = _path(args)
    mode = int(args.get("mode", 0o644))
    if not 0 <= mode <= 0o7777:
        raise OSError(errno.EINVAL, f"mode {mode:#o} is not a valid file mode")
    if data_fd is None:
        raise OSError(errno.EINVAL, "write_file needs a data descriptor")
    directory = os.path.dirname(path) or b"."
    if args.get("parents"):
        os.makedirs(directory, 0o755, exist_ok=True)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    temporary = os.path.join(
        directory, b".engine-upload-" + os.urandom(6).hex().encode()
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as error:
        # Name the path the caller asked for, not the temporary file.
        raise OSError(error.errno, error.strerror, path) from None
    size = 0
    try:
        while chunk := os.read(data_fd, CHUNK_BYTES):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            size += len(chunk)
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return {"size": size}


def read_file(args: dict[str, Any], data_fd: int | None, result_fd: int) -> None:
    """Report the file's size, then stream its bytes to the data descriptor."""
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
        while chunk := os.read(fd, CHUNK_BYTES):
            view = memoryview(chunk)
            while view:
                view = view[os.write(data_fd, view) :]
    finally:
        os.close(fd)


def stat_file(args: dict[str, Any], *_: object) -> dict[str, Any]:
    return {"info": _info(_path(args))}


def list_files(args: dict[str, Any], *_: object) -> dict[str, Any]:
    path = _path(args)
    entries: list[dict[str, Any]] = []
    truncated = False
    for entry_path, name in _walk(path, bool(args.get("recursive"))):
        if len(entries) >= MAX_ENTRIES:
            truncated = True
            break
        try:
            entries.append(_info(entry_path, name))
        except FileNotFoundError:
            continue
    return {"entries": entries, "truncated": truncated}


def _walk(path: bytes, recursive: bool) -> Iterator[tuple[bytes, bytes]]:
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
    pending = [path]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except (PermissionError, FileNotFoundError):
            if directory == path:
                raise
            continue
        for entry in entries:
            yield entry.path, entry.name
            if recursive and entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)


def make_directory(args: dict[str, Any], *_: object) -> dict[str, Any]:
    path = _path(args)
    mode = int(args.get("mode", 0o755))
    if args.get("parents", True):
        os.makedirs(path, mode, exist_ok=bool(args.get("exist_ok", True)))
    else:
        os.mkdir(path, mode)
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
    if os.path.isfile(path):
        yield path
        return
    for entry_path, _ in _walk(path, recursive=True):
        try:
            status = os.lstat(entry_path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(status.st_mode) and status.st_size <= MAX_SEARCH_FILE_BYTES:
            yield entry_path


def find_in_files(args: dict[str, Any], *_: object) -> dict[str, Any]:
    pattern = re.compile(os.fsencode(args["pattern"]))
    limit = min(int(args.get("max_matches", MAX_MATCHES)), MAX_MATCHES)
    matches: list[dict[str, Any]] = []
    for path in _regular_files(_path(args)):
        try:
            lines = _lines(path)
            for number, line in lines:
                for match in pattern.finditer(line):
                    if len(matches) >= limit:
                        return {"matches": matches, "truncated": True}
                    matches.append(
                        {
                            "path": os.fsdecode(path),
                            "line": number,
                            "column": match.start() + 1,
                            "text": line.rstrip(b"\r\n").decode(errors="replace"),
                        }
                    )
        except (PermissionError, FileNotFoundError, IsADirectoryError):
            continue
    return {"matches": matches, "truncated": False}


def _lines(path: bytes) -> list[tuple[int, bytes]]:
    with open(path, "rb") as file:
        head = file.read(8192)
        if b"\0" in head:
            return []
        file.seek(0)
        return list(enumerate(file, start=1))


def replace_in_files(args: dict[str, Any], *_: object) -> dict[str, Any]:
    """Replace ``pattern`` by ``replacement`` in files under ``path``.

    Only files that match are rewritten, each atomically through a temporary
    file that keeps the original's mode and owner.
    """
    pattern = re.compile(os.fsencode(args["pattern"]))
    replacement = os.fsencode(args["replacement"])
    changed: list[str] = []
    for path in _regular_files(_path(args)):
        try:
            with open(path, "rb") as file:
                content = file.read()
        except (PermissionError, FileNotFoundError):
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
    status = os.stat(path)
    directory = os.path.dirname(path) or b"."
    temporary = os.path.join(
        directory, b".engine-replace-" + os.urandom(6).hex().encode()
    )
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fchown(fd, status.st_uid, status.st_gid)
        os.fchmod(fd, stat.S_IMODE(status.st_mode))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
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
