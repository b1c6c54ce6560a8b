"""File operations on a running sandbox, as the Engine offers them.

Each operation runs in a worker that the sandbox's PID 1 forks (see
engine/runtime/files.py), so paths resolve inside the sandbox and the worker
can do only what the sandbox's root can. Data moves through pipes in chunks,
so no file is ever held whole in the daemon's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import posixpath
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    from engine.core.engine import Engine

CHUNK_BYTES = 1024 * 1024
MAX_PATH_BYTES = 4096


@dataclass(frozen=True)
class FileInfo:
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
    errno.ENOTEMPTY: FailedPrecondition,
    errno.EBUSY: FailedPrecondition,
}


def _error(sandbox_id: str, result: dict[str, Any]) -> EngineError:
    code = int(result.get("errno", errno.EIO))
    kind = _ERRORS.get(code, InvalidArgument)
    message = result.get("message", os.strerror(code))
    if code == errno.ENOTEMPTY:
        message += "; pass recursive=True to delete a directory with its contents"
    return kind(f"{message} (sandbox {sandbox_id})")


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
            raise InvalidArgument(f"{field} is longer than {MAX_PATH_BYTES} bytes")
        if not path.startswith("/"):
            workdir = self.engine.sandboxes[sandbox_id].info.spec.workdir
            path = posixpath.join(workdir, path)
        return path

    async def _run(
        self,
        sandbox_id: str,
        action: str,
        args: dict[str, Any],
        data_fd: int | None = None,
    ) -> tuple[int, asyncio.StreamReader]:
        """Start a worker; return the read end of its result pipe as a reader."""
        sandbox = self.engine._get_running(sandbox_id)
        self.engine._touch(sandbox)
        assert sandbox.supervisor is not None
        result_read, result_write = os.pipe2(os.O_CLOEXEC)
        fds = [result_write] if data_fd is None else [result_write, data_fd]
        try:
            await sandbox.supervisor.file(action, args, fds)
        except (OSError, ConnectionError) as error:
            os.close(result_read)
            raise FailedPrecondition(
                f"sandbox {sandbox_id} could not start a file operation: {error}"
            ) from error
        finally:
            os.close(result_write)
        return result_read, await _reader(result_read)

    async def _call(
        self, sandbox_id: str, action: str, args: dict[str, Any]
    ) -> dict[str, Any]:
        fd, reader = await self._run(sandbox_id, action, args)
        try:
            return _checked(sandbox_id, await reader.readline())
        finally:
            _close_reader(reader, fd)

    async def stat_file(self, sandbox_id: str, path: str) -> FileInfo:
        path = self._resolve(sandbox_id, path)
        result = await self._call(sandbox_id, "stat_file", {"path": path})
        return FileInfo(**result["info"])

    async def list_files(
        self, sandbox_id: str, path: str, *, recursive: bool = False
    ) -> tuple[list[FileInfo], bool]:
        path = self._resolve(sandbox_id, path)
        args = {"path": path, "recursive": recursive}
        result = await self._call(sandbox_id, "list_files", args)
        return [FileInfo(**entry) for entry in result["entries"]], result["truncated"]

    async def make_directory(
        self, sandbox_id: str, path: str, *, mode: int = 0o755, parents: bool = True
    ) -> FileInfo:
        path = self._resolve(sandbox_id, path)
        _check_mode(mode)
        args = {"path": path, "mode": mode, "parents": parents}
        result = await self._call(sandbox_id, "make_directory", args)
        return FileInfo(**result["info"])

    async def delete_file(self, sandbox_id: str, path: str) -> None:
        path = self._resolve(sandbox_id, path)
        await self._call(sandbox_id, "delete_file", {"path": path})

    async def delete_directory(
        self, sandbox_id: str, path: str, *, recursive: bool = False
    ) -> None:
        path = self._resolve(sandbox_id, path)
        args = {"path": path, "recursive": recursive}
        await self._call(sandbox_id, "delete_directory", args)

    async def move(
        self, sandbox_id: str, source: str, destination: str, *, overwrite: bool = True
    ) -> FileInfo:
        args = {
            "source": self._resolve(sandbox_id, source, "source"),
            "destination": self._resolve(sandbox_id, destination, "destination"),
            "overwrite": overwrite,
        }
        result = await self._call(sandbox_id, "move", args)
        return FileInfo(**result["info"])

    async def chmod(self, sandbox_id: str, path: str, mode: int) -> FileInfo:
        path = self._resolve(sandbox_id, path)
        _check_mode(mode)
        result = await self._call(sandbox_id, "chmod", {"path": path, "mode": mode})
        return FileInfo(**result["info"])

    async def find_in_files(
        self, sandbox_id: str, path: str, pattern: str, *, max_matches: int = 10_000
    ) -> tuple[list[Match], bool]:
        path = self._resolve(sandbox_id, path)
        _check_pattern(pattern)
        if max_matches < 1:
            raise InvalidArgument(f"max_matches must be 1 or more, not {max_matches}")
        args = {"path": path, "pattern": pattern, "max_matches": max_matches}
        result = await self._call(sandbox_id, "find_in_files", args)
        matches = [Match(**match) for match in result["matches"]]
        return matches, result["truncated"]

    async def replace_in_files(
        self, sandbox_id: str, path: str, pattern: str, replacement: str
    ) -> list[str]:
        path = self._resolve(sandbox_id, path)
        _check_pattern(pattern)
        args = {"path": path, "pattern": pattern, "replacement": replacement}
        result = await self._call(sandbox_id, "replace_in_files", args)
        return list(result["changed"])

    async def write_file(
        self,
        sandbox_id: str,
        path: str,
        chunks: AsyncIterator[bytes],
        *,
        mode: int = 0o644,
        parents: bool = False,
    ) -> int:
        """Write the bytes of ``chunks`` to ``path`` atomically; return the size."""
        path = self._resolve(sandbox_id, path)
        _check_mode(mode)
        data_read, data_write = os.pipe2(os.O_CLOEXEC)
        args = {"path": path, "mode": mode, "parents": parents}
        try:
            fd, reader = await self._run(sandbox_id, "write_file", args, data_read)
        finally:
            os.close(data_read)
        try:
            result_line = asyncio.ensure_future(reader.readline())
            try:
                await _pump(chunks, data_write, result_line)
            finally:
                os.close(data_write)
            return int(_checked(sandbox_id, await result_line)["size"])
        finally:
            _close_reader(reader, fd)

    async def read_file(
        self, sandbox_id: str, path: str
    ) -> tuple[int, AsyncIterator[bytes]]:
        """Open ``path``; return its size and an iterator over its bytes."""
        path = self._resolve(sandbox_id, path)
        data_read, data_write = os.pipe2(os.O_CLOEXEC)
        try:
            fd, reader = await self._run(
                sandbox_id, "read_file", {"path": path}, data_write
            )
        except BaseException:
            os.close(data_read)
            raise
        finally:
            os.close(data_write)
        try:
            result = _checked(sandbox_id, await reader.readline())
        except BaseException:
            os.close(data_read)
            raise
        finally:
            _close_reader(reader, fd)
        return int(result["size"]), _chunks(data_read, int(result["size"]))


def _check_mode(mode: int) -> None:
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InvalidArgument(f"mode {mode!r} must be between 0 and 0o7777, e.g. 0o644")


def _check_pattern(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise InvalidArgument(
            f"pattern {pattern!r} is not a valid regular expression: {error}"
        ) from None


def _checked(sandbox_id: str, line: bytes) -> dict[str, Any]:
    if not line:
        raise InternalError(
            f"the file worker of sandbox {sandbox_id} exited without a result"
        )
    result = json.loads(line)
    if not result.get("ok"):
        raise _error(sandbox_id, result)
    return result


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
    chunks: AsyncIterator[bytes], fd: int, result: asyncio.Future[bytes]
) -> None:
    """Write every chunk to the pipe ``fd``; stop early if the worker reports first."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    async for chunk in chunks:
        view = memoryview(chunk)
        while view:
            if result.done():
                return
            try:
                view = view[os.write(fd, view) :]
                continue
            except BlockingIOError:
                pass
            except BrokenPipeError:
                return
            writable = _ready_future(loop, fd, write=True)
            try:
                await asyncio.wait(
                    [writable, result], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                loop.remove_writer(fd)


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


async def _chunks(fd: int, size: int) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                data = os.read(fd, CHUNK_BYTES)
            except BlockingIOError:
                try:
                    await _ready_future(loop, fd, write=False)
                finally:
                    loop.remove_reader(fd)
                continue
            if not data:
                return
            yield data
    finally:
        os.close(fd)
