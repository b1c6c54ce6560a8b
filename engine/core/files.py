"""File operations on a running sandbox, as the Engine offers them.

Each operation runs in a worker that the zygote forks into the sandbox's user
and mount namespaces (see engine/runtime/fileworker.py and files.py), so paths
resolve inside the sandbox and the worker can do only what the sandbox's root
can. Data moves through pipes in chunks,
so no file is ever held whole in the daemon's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import posixpath
import re
import secrets
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.core.models import SandboxState
from engine.errors import (
    AlreadyExists,
    EngineError,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)

if TYPE_CHECKING:
    from engine.core.engine import Engine, _Sandbox

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
MAX_PATH_BYTES = 4096
# find_in_files returns at most this many matches (the worker's MAX_MATCHES).
MAX_MATCHES = 10_000
# Data pipes are grown to this size (F_SETPIPE_SZ), so one read or write moves
# a whole chunk instead of the default 64 KiB.
PIPE_BYTES = CHUNK_BYTES
# Length prefix of each data frame sent to write_file's worker.
FRAME_HEADER = struct.Struct("<Q")
# Seconds to wait for a killed worker to exit before giving up on it.
WORKER_EXIT_TIMEOUT = 10.0
# File operations that may run at once in one sandbox. Each is a host process
# of about 11 MiB (the change in `free` with 150 stalled downloads, Linux 6.18,
# CPython 3.11), and a download's worker lives while its stream is open.
# NOTE: 32 is a judgment (four times the load benchmark's 8 clients), not a
# measured need.
MAX_FILE_WORKERS = 32
# Actions whose workers join the sandbox's cgroups. Writes do, so that the
# tmpfs pages they make count against the sandbox's memory limit. Searches and
# listings do too, because their memory and CPU time grow with what sandbox
# code controls. A line of a sparse file can be gigabytes long, a directory
# can have millions of entries, and a pattern can backtrack for hours.
CHARGED_ACTIONS = frozenset(
    {"write_file", "replace_in_files", "find_in_files", "list_files"}
)
# Advice in the error of a worker of these actions that reached the sandbox's
# memory limit.
OOM_ADVICE = {
    "find_in_files": "find_in_files reads each line of a file into memory; search"
    " files with shorter lines or create the sandbox with more memory",
    "replace_in_files": "replace_in_files reads each whole file into memory;"
    " pass smaller files or create the sandbox with more memory",
    "list_files": "list_files reads every entry of a directory into memory; list"
    " a smaller directory or create the sandbox with more memory",
}
# The advice for writes, whose tmpfs pages count against the memory limit.
WRITE_OOM_ADVICE = (
    "Files in /tmp count against that limit, because /tmp is a tmpfs; write to"
    " another directory or create the sandbox with more memory"
)


@dataclass(frozen=True)
class FileInfo:
    """Metadata of one path inside a sandbox, as lstat(2) reports it there.

    ``mode`` is the permission bits (0 to 0o7777), ``mtime`` is in seconds
    since the epoch, and ``uid`` and ``gid`` are the ids inside the sandbox.
    Names that are not valid UTF-8 hold lone surrogates, as from os.fsdecode.
    """

    path: str
    name: str
    size: int
    mode: int
    # "file", "dir", "symlink" or "other"
    type: str
    mtime: float
    uid: int
    gid: int
    # The link's target for a symlink, else "".
    target: str

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_symlink(self) -> bool:
        return self.type == "symlink"


@dataclass(frozen=True)
class Match:
    """One match of find_in_files.

    ``line`` counts from 1, and ``column`` is the 1-based byte offset of the
    match in the line. ``text`` is the line, cut to 512 bytes around the
    match when longer.
    """

    path: str
    line: int
    column: int
    text: str


_ERRORS: dict[int, type[EngineError]] = {
    errno.ENOENT: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
    errno.EROFS: PermissionDenied,
    errno.ENOSPC: ResourceExhausted,
    errno.EDQUOT: ResourceExhausted,
    errno.EFBIG: ResourceExhausted,
    errno.ETIMEDOUT: ResourceExhausted,
    errno.ENOTEMPTY: FailedPrecondition,
    errno.EBUSY: FailedPrecondition,
}


def _error(sandbox_id: str, result: dict[str, Any]) -> EngineError:
    """Return the EngineError for a worker's failure report."""
    code = int(result.get("errno", errno.EIO))
    kind = _ERRORS.get(code, InvalidArgument)
    message = result.get("message", os.strerror(code))
    if code == errno.ENOTEMPTY:
        message += "; pass recursive=True to delete a directory with its contents"
    if code == errno.EDQUOT:
        message += (
            "; the sandbox's writable layer is at its disk limit: delete files"
            " or create the sandbox with a larger disk"
        )
    return kind(f"{message} (sandbox {sandbox_id})")


@dataclass(frozen=True)
class FileContent:
    """An open file in a sandbox: its size and mode at the open, and its bytes.

    Iterate ``chunks`` to its end or call its ``aclose``, which closes the pipe.
    """

    size: int
    mode: int
    chunks: _PipeChunks


@dataclass
class _Worker:
    """A running file operation worker and the read end of its result pipe."""

    sandbox: _Sandbox
    action: str
    pid: int
    fd: int
    reader: asyncio.StreamReader
    # OOM kills in the sandbox's cgroup before the worker started, or None
    # when the cgroup does not report them.
    oom_kills: int | None

    def close(self) -> None:
        self.sandbox.file_workers.discard(self.pid)
        _close_reader(self.reader, self.fd)


class SandboxFiles:
    """The file API of the Engine: one coroutine per operation."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _resolve(self, sandbox_id: str, path: str, field: str = "path") -> str:
        if not isinstance(path, str) or not path:
            raise InvalidArgument(f"{field} is empty; pass a path inside the sandbox")
        if "\0" in path:
            raise InvalidArgument(f"{field} {path!r} contains a NUL byte")
        if len(os.fsencode(path)) > MAX_PATH_BYTES:
            raise InvalidArgument(
                f"{field} {_shorten(path)} is longer than {MAX_PATH_BYTES} bytes"
            )
        if not path.startswith("/"):
            workdir = self.engine._get(sandbox_id).info.spec.workdir
            path = posixpath.join(workdir, path)
        return path

    async def _start(
        self,
        sandbox_id: str,
        action: str,
        args: dict[str, Any],
        data_fd: int | None = None,
    ) -> _Worker:
        """Start a worker that reports on a new result pipe."""
        sandbox = self.engine._get_running(sandbox_id)
        self.engine._touch(sandbox)
        init = sandbox.init
        if init is None or init.pidfd is None or sandbox.cgroup is None:
            raise FailedPrecondition(f"sandbox {sandbox_id} is not running")
        running = len(sandbox.file_workers) + sandbox.file_workers_starting
        if running >= MAX_FILE_WORKERS:
            raise ResourceExhausted(
                f"sandbox {sandbox_id} has {running} file operations running, and"
                f" the maximum is {MAX_FILE_WORKERS}; wait for one to finish, or"
                " read or cancel the downloads that are open"
            )
        sandbox.file_workers_starting += 1
        try:
            return await self._fork_worker(sandbox, init.pidfd, action, args, data_fd)
        finally:
            sandbox.file_workers_starting -= 1

    async def _fork_worker(
        self,
        sandbox: _Sandbox,
        init_pidfd: int,
        action: str,
        args: dict[str, Any],
        data_fd: int | None,
    ) -> _Worker:
        assert sandbox.cgroup is not None
        sandbox_id = sandbox.info.sandbox_id
        oom_kills = _oom_kills(sandbox)
        cgroup_fds = []
        result_read, result_write = os.pipe2(os.O_CLOEXEC)
        fds = [result_write] if data_fd is None else [result_write, data_fd]
        try:
            if action in CHARGED_ACTIONS:
                for path in sandbox.cgroup.procs_files():
                    cgroup_fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            pid = await self.engine.spawner.file(
                init_pidfd, action, args, fds, cgroup_fds
            )
        except (OSError, ConnectionError) as error:
            os.close(result_read)
            raise FailedPrecondition(
                f"sandbox {sandbox_id} could not start a file operation: {error}"
            ) from error
        finally:
            os.close(result_write)
            for fd in cgroup_fds:
                os.close(fd)
        # The worker reports through its pipe; its reap matters to nobody.
        self.engine.spawner.forget_reap(pid)
        sandbox.file_workers.add(pid)
        try:
            reader = await _reader(result_read)
        except BaseException:
            os.close(result_read)
            sandbox.file_workers.discard(pid)
            with contextlib.suppress(ConnectionError, OSError):
                self.engine.spawner.kill(pid)
            raise
        return _Worker(sandbox, action, pid, result_read, reader, oom_kills)

    async def _call(
        self, sandbox_id: str, action: str, args: dict[str, Any], path: str
    ) -> dict[str, Any]:
        worker = await self._start(sandbox_id, action, args)
        line = b""
        try:
            line = await worker.reader.readline()
            return self._checked(worker, line, path)
        finally:
            if not line:
                # The call was cancelled, or reading the result failed. The
                # worker's result is lost, so it is killed, not left running.
                self._kill(worker)
            worker.close()

    def _kill(self, worker: _Worker) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            self.engine.spawner.kill(worker.pid)

    def _checked(self, worker: _Worker, line: bytes, path: str) -> dict[str, Any]:
        """Parse a worker's result line, raising its error as an EngineError."""
        sandbox_id = worker.sandbox.info.sandbox_id
        if not line:
            raise self._worker_died(worker, path)
        result = json.loads(line)
        if not result.get("ok"):
            raise _error(sandbox_id, result)
        return result

    def _worker_died(self, worker: _Worker, path: str) -> EngineError:
        """Return the error for a worker that exited without a result."""
        sandbox = worker.sandbox
        sandbox_id = sandbox.info.sandbox_id
        after = _oom_kills(sandbox)
        oom_killed = (
            worker.oom_kills is not None
            and after is not None
            and after > worker.oom_kills
        )
        if oom_killed:
            memory = sandbox.info.spec.memory_mib
            limit = f"{memory} MiB" if memory is not None else "no limit set"
            advice = OOM_ADVICE.get(worker.action, WRITE_OOM_ADVICE)
            return ResourceExhausted(
                f"{path!r}: the file operation reached the memory limit of"
                f" sandbox {sandbox_id} ({limit}) and was killed. {advice}"
            )
        return InternalError(
            f"{path!r}: the file worker of sandbox {sandbox_id} exited without a result"
        )

    async def _stop(self, worker: _Worker, result: asyncio.Future[bytes]) -> None:
        """Kill ``worker`` unless it has reported, and wait until it has exited.

        The worker's end of the result pipe closes when it exits, which ends
        ``result``.
        """
        if not result.done():
            self._kill(worker)
        try:
            async with asyncio.timeout(WORKER_EXIT_TIMEOUT):
                await asyncio.shield(result)
        except (TimeoutError, ConnectionError, OSError):
            logger.warning(
                "file worker %d of sandbox %s did not exit within %.0f s of SIGKILL",
                worker.pid,
                worker.sandbox.info.sandbox_id,
                WORKER_EXIT_TIMEOUT,
            )

    async def _remove_quietly(self, sandbox_id: str, path: str) -> None:
        """Delete ``path``, logging instead of raising when that fails."""
        try:
            await self._call(sandbox_id, "delete_file", {"path": path}, path)
        except NotFound:
            pass
        except (EngineError, OSError) as error:
            logger.warning(
                "could not remove %r in sandbox %s: %s", path, sandbox_id, error
            )

    async def stat_file(self, sandbox_id: str, path: str) -> FileInfo:
        path = self._resolve(sandbox_id, path)
        result = await self._call(sandbox_id, "stat_file", {"path": path}, path)
        return FileInfo(**result["info"])

    async def list_files(
        self, sandbox_id: str, path: str, *, recursive: bool = False
    ) -> tuple[list[FileInfo], bool]:
        """List ``path``; return the entries and whether the list was truncated."""
        path = self._resolve(sandbox_id, path)
        args = {"path": path, "recursive": recursive}
        result = await self._call(sandbox_id, "list_files", args, path)
        return [FileInfo(**entry) for entry in result["entries"]], result["truncated"]

    async def make_directory(
        self, sandbox_id: str, path: str, *, mode: int = 0o755, parents: bool = True
    ) -> FileInfo:
        path = self._resolve(sandbox_id, path)
        _check_mode(mode)
        args = {"path": path, "mode": mode, "parents": parents}
        result = await self._call(sandbox_id, "make_directory", args, path)
        return FileInfo(**result["info"])

    async def delete_file(self, sandbox_id: str, path: str) -> None:
        path = self._resolve(sandbox_id, path)
        await self._call(sandbox_id, "delete_file", {"path": path}, path)

    async def delete_directory(
        self, sandbox_id: str, path: str, *, recursive: bool = False
    ) -> None:
        path = self._resolve(sandbox_id, path)
        args = {"path": path, "recursive": recursive}
        await self._call(sandbox_id, "delete_directory", args, path)

    async def move(
        self, sandbox_id: str, source: str, destination: str, *, overwrite: bool = True
    ) -> FileInfo:
        args = {
            "source": self._resolve(sandbox_id, source, "source"),
            "destination": self._resolve(sandbox_id, destination, "destination"),
            "overwrite": overwrite,
        }
        result = await self._call(sandbox_id, "move", args, args["source"])
        return FileInfo(**result["info"])

    async def chmod(self, sandbox_id: str, path: str, mode: int) -> FileInfo:
        path = self._resolve(sandbox_id, path)
        _check_mode(mode)
        args = {"path": path, "mode": mode}
        result = await self._call(sandbox_id, "chmod", args, path)
        return FileInfo(**result["info"])

    async def find_in_files(
        self,
        sandbox_id: str,
        path: str,
        pattern: str,
        *,
        max_matches: int = MAX_MATCHES,
    ) -> tuple[list[Match], bool]:
        """Search files for ``pattern``; return the matches and whether they are cut."""
        path = self._resolve(sandbox_id, path)
        _check_pattern(pattern)
        if not 1 <= max_matches <= MAX_MATCHES:
            raise InvalidArgument(
                f"invalid max_matches {max_matches}: expected 1 to {MAX_MATCHES}"
            )
        args = {"path": path, "pattern": pattern, "max_matches": max_matches}
        result = await self._call(sandbox_id, "find_in_files", args, path)
        matches = [Match(**match) for match in result["matches"]]
        return matches, result["truncated"]

    async def replace_in_files(
        self, sandbox_id: str, path: str, pattern: str, replacement: str
    ) -> list[str]:
        """Replace ``pattern`` in the files under ``path``; return the changed paths."""
        path = self._resolve(sandbox_id, path)
        _check_pattern(pattern, replacement)
        args = {"path": path, "pattern": pattern, "replacement": replacement}
        result = await self._call(sandbox_id, "replace_in_files", args, path)
        return list(result["changed"])

    async def write_file(
        self,
        sandbox_id: str,
        path: str,
        chunks: AsyncIterator[bytes],
        *,
        mode: int = 0o644,
        parents: bool = False,
        overwrite: bool = True,
    ) -> int:
        """Write the bytes of ``chunks`` to ``path`` atomically; return the size.

        If ``chunks`` raises or the call is cancelled, the worker never
        receives the end frame, so no partial file replaces ``path``. The
        worker is then killed and any temporary file it made is removed.
        """
        path = self._resolve(sandbox_id, path)
        _check_mode(mode)
        temporary = f".engine-upload-{secrets.token_hex(6)}"
        temporary_path = posixpath.join(posixpath.dirname(path), temporary)
        args = {
            "path": path,
            "mode": mode,
            "parents": parents,
            "overwrite": overwrite,
            "temporary": temporary,
        }
        data_read, data_write = os.pipe2(os.O_CLOEXEC)
        _grow_pipe(data_write)
        try:
            worker = await self._start(sandbox_id, "write_file", args, data_read)
        except BaseException:
            os.close(data_write)
            raise
        finally:
            os.close(data_read)
        result_line = asyncio.ensure_future(worker.reader.readline())
        try:
            try:
                await _pump(
                    chunks,
                    data_write,
                    result_line,
                    lambda: self.engine._touch(worker.sandbox),
                )
            except BaseException:
                # Without the end frame the worker never commits the file, so
                # stopping it here only frees its resources sooner.
                await self._stop(worker, result_line)
                await self._remove_quietly(sandbox_id, temporary_path)
                raise
            finally:
                os.close(data_write)
            line = await result_line
            if not line:
                await self._remove_quietly(sandbox_id, temporary_path)
            return int(self._checked(worker, line, path)["size"])
        finally:
            result_line.cancel()
            worker.close()

    async def read_file(self, sandbox_id: str, path: str) -> FileContent:
        """Open ``path``; return its size and mode and an iterator over its bytes.

        The iterator raises InternalError if the file shrinks while it is read.
        """
        path = self._resolve(sandbox_id, path)
        data_read, data_write = os.pipe2(os.O_CLOEXEC)
        _grow_pipe(data_write)
        try:
            worker = await self._start(
                sandbox_id, "read_file", {"path": path}, data_write
            )
        except BaseException:
            os.close(data_read)
            raise
        finally:
            os.close(data_write)
        line = b""
        try:
            line = await worker.reader.readline()
            result = self._checked(worker, line, path)
        except BaseException:
            os.close(data_read)
            if not line:
                self._kill(worker)
            worker.close()
            raise
        # The worker sends the file's bytes after its result line, and a
        # caller that stops reading blocks it. So it stays in file_workers
        # until the pipe closes, and terminate kills it. Otherwise its mount
        # namespace would keep the terminated sandbox's layer in use.
        _close_reader(worker.reader, worker.fd)
        size = int(result["size"])
        sandbox = worker.sandbox

        def check_size(received: int) -> None:
            if received >= size:
                return
            if sandbox.info.state == SandboxState.TERMINATED:
                raise FailedPrecondition(
                    f"sandbox {sandbox_id} was terminated while {path!r} was"
                    f" read, after {received} of {size} bytes"
                )
            raise InternalError(
                f"{path!r} in sandbox {sandbox_id} shrank from {size} to"
                f" {received} bytes while it was read"
            )

        chunks = _PipeChunks(
            data_read,
            lambda: self.engine._touch(sandbox),
            check_size,
            lambda: sandbox.file_workers.discard(worker.pid),
        )
        return FileContent(size=size, mode=int(result["mode"]), chunks=chunks)


def _shorten(path: str) -> str:
    if len(path) > 64:
        return f"{path[:64]!r}... ({len(path)} characters)"
    return repr(path)


def _oom_kills(sandbox: _Sandbox) -> int | None:
    if sandbox.cgroup is None:
        return None
    try:
        return sandbox.cgroup.oom_kills()
    except (EngineError, OSError, ValueError):
        return None


def _grow_pipe(fd: int) -> None:
    # F_SETPIPE_SZ fails above /proc/sys/fs/pipe-max-size for an unprivileged
    # process; the pipe then keeps its default size.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _check_mode(mode: int) -> None:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        shown = f"{mode:#o} ({mode})" if isinstance(mode, int) else repr(mode)
        raise InvalidArgument(
            f"invalid mode {shown}: expected permission bits from 0 to 0o7777,"
            " such as 0o644"
        )


def _check_pattern(pattern: str, replacement: str | None = None) -> None:
    """Compile ``pattern`` and ``replacement`` as the worker does, on bytes."""
    if not isinstance(pattern, str) or not pattern:
        raise InvalidArgument("pattern is empty; pass a regular expression")
    try:
        compiled = re.compile(os.fsencode(pattern))
    except re.error as error:
        raise InvalidArgument(
            f"invalid pattern {pattern!r}: not a valid regular expression: {error}"
        ) from None
    if replacement is None:
        return
    try:
        # Parsing the template checks its group references even without a match.
        compiled.sub(os.fsencode(replacement), b"")
    except (re.error, IndexError) as error:
        raise InvalidArgument(
            f"invalid replacement {replacement!r} for pattern {pattern!r}: {error}"
        ) from None


async def _reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    protocol = asyncio.StreamReaderProtocol(reader)
    await loop.connect_read_pipe(
        lambda: protocol, os.fdopen(fd, "rb", buffering=0, closefd=False)
    )
    return reader


def _close_reader(reader: asyncio.StreamReader, fd: int) -> None:
    transport = getattr(reader, "_transport", None)
    if transport is not None:
        transport.close()
    with contextlib.suppress(OSError):
        os.close(fd)


async def _pump(
    chunks: AsyncIterator[bytes],
    fd: int,
    result: asyncio.Future[bytes],
    touch: Callable[[], None],
) -> None:
    """Send every chunk to the pipe ``fd`` as a frame, then the end frame.

    Each frame is an 8-byte little-endian length and the bytes, and a zero
    length ends the file, which the worker commits only then. Stops early,
    without the end frame, if the worker reports (an error) first. ``touch``
    runs once per chunk, so a long transfer counts as activity for the
    sandbox's TTL.
    """
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    async for chunk in chunks:
        touch()
        if not chunk:
            continue
        header = FRAME_HEADER.pack(len(chunk))
        for part in (header, chunk):
            if not await _write(loop, fd, memoryview(part), result):
                return
    await _write(loop, fd, memoryview(FRAME_HEADER.pack(0)), result)


async def _write(
    loop: asyncio.AbstractEventLoop,
    fd: int,
    view: memoryview,
    result: asyncio.Future[bytes],
) -> bool:
    """Write ``view`` to the non-blocking pipe ``fd``; False if the worker reported."""
    while view:
        if result.done():
            return False
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        except BrokenPipeError:
            return False
        writable = _ready_future(loop, fd, write=True)
        try:
            await asyncio.wait([writable, result], return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_writer(fd)
    return True


def _ready_future(
    loop: asyncio.AbstractEventLoop, fd: int, *, write: bool
) -> asyncio.Future[None]:
    """Return a future that completes when ``fd`` is writable (or readable)."""
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    return future


class _PipeChunks:
    """Async iterator over the bytes of a pipe, which it closes at the end.

    Unlike an async generator, ``aclose`` closes the pipe even before the
    first chunk, so a download cancelled after its header leaks no descriptor.
    """

    def __init__(
        self,
        fd: int,
        touch: Callable[[], None],
        at_end: Callable[[int], None],
        on_close: Callable[[], None],
    ) -> None:
        self._fd = fd
        self._touch = touch
        self._at_end = at_end
        self._on_close = on_close
        self._received = 0
        os.set_blocking(fd, False)

    def __aiter__(self) -> _PipeChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._fd < 0:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = os.read(self._fd, CHUNK_BYTES)
            except BlockingIOError:
                readable = _ready_future(loop, self._fd, write=False)
                try:
                    await readable
                finally:
                    loop.remove_reader(self._fd)
                continue
            except BaseException:
                self.close()
                raise
            if not data:
                self.close()
                self._at_end(self._received)
                raise StopAsyncIteration
            self._received += len(data)
            self._touch()
            return data

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._on_close()
