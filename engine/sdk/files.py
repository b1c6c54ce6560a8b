"""``sb.fs``: files and directories of a running sandbox, sync and asyncio.

    with Sandbox().create() as sb:
        sb.fs.write_text("/tmp/hello.txt", "hello\\n")
        sb.fs.read_text("/tmp/hello.txt")               # "hello\\n"
        sb.fs.upload_file("data.csv", "/tmp/data.csv", mode=0o640)
        [f.name for f in sb.fs.list_files("/tmp")]     # ["data.csv", "hello.txt"]

Paths are resolved inside the sandbox, relative ones against its workdir.
Transfers stream in chunks of 1 MiB, so ``upload_file`` and ``download_file``
never hold a whole file in memory. A file name that is not valid UTF-8 comes
back as ``os.fsdecode`` returns it, with a lone surrogate for each such byte
(``"\\udcff"`` for the byte 0xFF), and such a ``str`` (or ``bytes``) is accepted
wherever a path is.

Every method raises the classes of ``engine.errors``: NotFound, AlreadyExists,
PermissionDenied, InvalidArgument, FailedPrecondition (a terminated sandbox
or a non-empty directory) and ResourceExhausted (a full file system or the
sandbox's memory limit, which its /tmp counts against).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

import grpc

from engine import errors
from engine.core.files import MAX_MATCHES, FileInfo, Match
from engine.sdk.client import error_from_rpc
from engine.server.convert import timestamp_from_proto
from engine.v1 import filesystem_pb2 as pb
from engine.v1 import filesystem_pb2_grpc

if TYPE_CHECKING:
    from engine.sdk.aio import AsyncClient
    from engine.sdk.client import Client

logger = logging.getLogger(__name__)

# Bytes per UploadFile request, below gRPC's default 4 MiB message limit.
CHUNK_BYTES = 1024 * 1024
FILE_TYPES_FROM_PROTO = {
    pb.FILE_TYPE_FILE: "file",
    pb.FILE_TYPE_DIRECTORY: "dir",
    pb.FILE_TYPE_SYMLINK: "symlink",
    pb.FILE_TYPE_OTHER: "other",
}

PathArgument = str | bytes | os.PathLike[str] | os.PathLike[bytes]


class FileList(list[FileInfo]):
    """Entries of ``list_files``; ``truncated`` is true when a limit cut them."""

    truncated: bool = False


class MatchList(list[Match]):
    """Matches of ``find_in_files``; ``truncated`` is true when a limit cut them."""

    truncated: bool = False


def path_fields(path: PathArgument, field: str = "path") -> dict[str, Any]:
    """Return the request fields for ``path``: ``field``, or ``field_raw`` for bytes.

    ``field_raw`` carries a path that is not valid UTF-8, which a proto string
    cannot.
    """
    value = os.fspath(path)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return {field: value}
        try:
            value = os.fsencode(value)
        except UnicodeEncodeError:
            raise errors.InvalidArgument(
                f"invalid {field} {value!r}: it contains a surrogate that stands for"
                " no byte; pass bytes or a name as os.fsdecode returns it"
            ) from None
    if not isinstance(value, bytes):
        raise errors.InvalidArgument(f"invalid {field} {path!r}: expected str or bytes")
    try:
        return {field: value.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{field}_raw": value}


def check_mode(mode: int) -> int:
    """Return ``mode``, or raise InvalidArgument unless it is from 0 to 0o7777."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        shown = f"{mode:#o} ({mode})" if isinstance(mode, int) else repr(mode)
        raise errors.InvalidArgument(
            f"invalid mode {shown}: expected permission bits from 0 to 0o7777,"
            " such as 0o644"
        )
    return mode


def check_max_matches(max_matches: int) -> int:
    if isinstance(max_matches, bool) or not isinstance(max_matches, int):
        raise errors.InvalidArgument(
            f"invalid max_matches {max_matches!r}: expected an int"
        )
    if not 1 <= max_matches <= MAX_MATCHES:
        raise errors.InvalidArgument(
            f"invalid max_matches {max_matches}: expected 1 to {MAX_MATCHES}"
        )
    return max_matches


def _text(text: str, raw: bytes) -> str:
    return os.fsdecode(raw) if raw else text


def info_from_proto(message: pb.FileInfo) -> FileInfo:
    return FileInfo(
        path=_text(message.path, message.path_raw),
        name=_text(message.name, message.name_raw),
        size=message.size,
        mode=message.mode,
        type=FILE_TYPES_FROM_PROTO.get(message.type, "other"),
        mtime=timestamp_from_proto(message.mtime),
        uid=message.uid,
        gid=message.gid,
        target=_text(message.target, message.target_raw),
    )


def match_from_proto(message: pb.FileMatch) -> Match:
    return Match(
        path=_text(message.path, message.path_raw),
        line=message.line,
        column=message.column,
        text=message.text,
    )


def _upload_header(
    sandbox_id: str,
    remote_path: PathArgument,
    mode: int,
    parents: bool,
    overwrite: bool,
) -> pb.UploadFileRequest:
    header = pb.UploadFileHeader(
        sandbox_id=sandbox_id,
        mode=check_mode(mode),
        parents=parents,
        overwrite=overwrite,
        **path_fields(remote_path),
    )
    return pb.UploadFileRequest(header=header)


def _check_header(response: Any, path: PathArgument) -> pb.DownloadFileHeader:
    if response is None or response.WhichOneof("message") != "header":
        raise errors.InternalError(
            f"the daemon's DownloadFile stream for {path!r} did not start with a header"
        )
    return response.header


def _check_received(received: int, header: pb.DownloadFileHeader, path: Any) -> None:
    if received != header.size:
        raise errors.InternalError(
            f"download of {path!r} ended after {received} of {header.size} bytes"
        )


def _temporary_path(local_path: PathArgument) -> str:
    directory, name = os.path.split(os.fsdecode(local_path))
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}.part")


def _open_temporary(path: str) -> IO[bytes]:
    # Mode 0o666 lets the umask decide, as open() does for a new file.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "wb")


def _host_file(path: PathArgument, fd: int) -> pb.HostFile:
    """Name an open local file for the daemon: its absolute path and identity."""
    status = os.fstat(fd)
    return pb.HostFile(
        path=os.path.abspath(os.fsdecode(path)),
        device=status.st_dev,
        inode=status.st_ino,
    )


class _RequestErrors:
    """The exception raised while producing the requests of a call, if any.

    gRPC ends a call whose request iterator raises with a status that hides
    the cause, such as a local read error, so the SDK raises the cause.
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None


class SandboxFileSystem:
    """``sb.fs``: the files of one sandbox, through the daemon's FileService."""

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self.sandbox_id = sandbox_id
        self._stub = filesystem_pb2_grpc.FileServiceStub(client._channel)

    def _call(self, method: str, request: Any) -> Any:
        self._client._check_open()
        try:
            return getattr(self._stub, method)(request)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self._client.address) from None

    def _stream(self, method: str, request: Any) -> Iterator[Any]:
        self._client._check_open()
        call = getattr(self._stub, method)(request)
        try:
            yield from call
        except grpc.RpcError as error:
            raise error_from_rpc(error, self._client.address) from None
        finally:
            call.cancel()

    # Transfers.

    def upload_fileobj(
        self,
        fileobj: IO[bytes],
        remote_path: PathArgument,
        mode: int = 0o644,
        *,
        parents: bool = False,
        overwrite: bool = True,
    ) -> int:
        """Write what ``fileobj.read`` returns, to its end, to ``remote_path``.

        The file appears atomically with ``mode`` once every byte is written.
        ``parents`` creates missing directories; without ``overwrite`` an
        existing file raises AlreadyExists. Returns the number of bytes written.
        """
        first = _upload_header(self.sandbox_id, remote_path, mode, parents, overwrite)
        failures = _RequestErrors()

        def requests() -> Iterator[pb.UploadFileRequest]:
            yield first
            size = 0
            try:
                while chunk := fileobj.read(CHUNK_BYTES):
                    size += len(chunk)
                    yield pb.UploadFileRequest(data=chunk)
            except BaseException as error:
                failures.error = error
                raise
            yield pb.UploadFileRequest(end=pb.UploadFileEnd(size=size))

        try:
            reply = self._call("UploadFile", requests())
        except errors.EngineError:
            if failures.error is not None:
                raise failures.error from None
            raise
        return reply.size

    def upload_file(
        self,
        local_path: PathArgument,
        remote_path: PathArgument,
        mode: int = 0o644,
        *,
        parents: bool = False,
        overwrite: bool = True,
    ) -> None:
        """Copy the local file ``local_path`` to ``remote_path`` in the sandbox.

        The copy is atomic: a reader in the sandbox sees the old file or the
        complete new one, with exactly ``mode`` (no umask).
        """
        with open(local_path, "rb") as file:
            if self._client.local_admin:
                header = _upload_header(
                    self.sandbox_id, remote_path, mode, parents, overwrite
                )
                header.header.host_file.CopyFrom(_host_file(local_path, file.fileno()))
                end = pb.UploadFileRequest(end=pb.UploadFileEnd(size=0))
                try:
                    self._call("UploadFile", iter([header, end]))
                    return
                except (errors.FailedPrecondition, errors.PermissionDenied):
                    # The daemon opens another file under this path, as a client
                    # in another mount namespace would cause, so stream instead.
                    pass
            self.upload_fileobj(
                file, remote_path, mode, parents=parents, overwrite=overwrite
            )

    def write_bytes(
        self,
        path: PathArgument,
        data: bytes | bytearray | memoryview,
        mode: int = 0o644,
        *,
        parents: bool = False,
    ) -> None:
        """Write ``data`` to ``path`` atomically, replacing any file there."""
        self.upload_fileobj(io.BytesIO(data), path, mode, parents=parents)

    def write_text(
        self,
        path: PathArgument,
        text: str,
        mode: int = 0o644,
        *,
        encoding: str = "utf-8",
        parents: bool = False,
    ) -> None:
        self.write_bytes(path, text.encode(encoding), mode, parents=parents)

    def download_fileobj(self, remote_path: PathArgument, fileobj: IO[bytes]) -> int:
        """Write the bytes of ``remote_path`` to ``fileobj``; return their count."""
        request = pb.DownloadFileRequest(
            sandbox_id=self.sandbox_id, **path_fields(remote_path)
        )
        responses = self._stream("DownloadFile", request)
        try:
            header = _check_header(next(responses, None), remote_path)
            received = 0
            for response in responses:
                # Each access of a bytes field copies it (upb), so read it once.
                data = response.data
                fileobj.write(data)
                received += len(data)
        finally:
            responses.close()
        _check_received(received, header, remote_path)
        return received

    def download_file(
        self, remote_path: PathArgument, local_path: PathArgument
    ) -> None:
        """Copy ``remote_path`` from the sandbox to the local file ``local_path``.

        The bytes go to a temporary file next to ``local_path``, renamed over
        it when complete, so a failed download leaves ``local_path`` unchanged.
        The new file gets mode 0o666 minus the umask, as open() gives.
        """
        temporary = _temporary_path(local_path)
        try:
            with _open_temporary(temporary) as file:
                if not self._download_to_host_file(remote_path, temporary, file):
                    self.download_fileobj(remote_path, file)
            os.replace(temporary, local_path)
        except BaseException:
            if os.path.lexists(temporary):
                os.unlink(temporary)
            raise

    def _download_to_host_file(
        self, remote_path: PathArgument, local_path: str, file: IO[bytes]
    ) -> bool:
        """Let the daemon write ``file`` itself; False if the caller must stream."""
        if not self._client.local_admin:
            return False
        request = pb.DownloadFileRequest(
            sandbox_id=self.sandbox_id,
            host_file=_host_file(local_path, file.fileno()),
            **path_fields(remote_path),
        )
        try:
            responses = list(self._stream("DownloadFile", request))
        except (errors.FailedPrecondition, errors.PermissionDenied):
            return False
        _check_header(responses[0] if responses else None, remote_path)
        return True

    def read_bytes(self, path: PathArgument) -> bytes:
        buffer = io.BytesIO()
        self.download_fileobj(path, buffer)
        return buffer.getvalue()

    def read_text(
        self, path: PathArgument, *, encoding: str = "utf-8", errors: str = "strict"
    ) -> str:
        return self.read_bytes(path).decode(encoding, errors)

    # Metadata and directories.

    def stat_file(self, path: PathArgument) -> FileInfo:
        """Return the metadata of ``path``, without following a final symlink."""
        request = pb.StatFileRequest(sandbox_id=self.sandbox_id, **path_fields(path))
        return info_from_proto(self._call("StatFile", request).file)

    def list_files(self, path: PathArgument, recursive: bool = False) -> FileList:
        """Return the entries of directory ``path``, or of its whole tree.

        A recursive listing is depth first: entries sorted by name, each
        directory followed by its own tree. The result's ``truncated`` is
        true when the daemon's limit of 100000 entries cut it.
        """
        request = pb.ListFilesRequest(
            sandbox_id=self.sandbox_id, recursive=recursive, **path_fields(path)
        )
        result = FileList()
        for response in self._stream("ListFiles", request):
            result.extend(info_from_proto(entry) for entry in response.files)
            result.truncated = result.truncated or response.truncated
        return result

    def create_directory(
        self, path: PathArgument, mode: int = 0o755, parents: bool = True
    ) -> FileInfo:
        """Create directory ``path`` with exactly ``mode``.

        With ``parents``, missing parents are created and an existing
        directory is kept unchanged; without, an existing path raises
        AlreadyExists.
        """
        request = pb.CreateDirectoryRequest(
            sandbox_id=self.sandbox_id,
            mode=check_mode(mode),
            parents=parents,
            **path_fields(path),
        )
        return info_from_proto(self._call("CreateDirectory", request).file)

    def delete_file(self, path: PathArgument) -> None:
        """Delete a file or a symlink; a directory raises InvalidArgument."""
        request = pb.DeleteFileRequest(sandbox_id=self.sandbox_id, **path_fields(path))
        self._call("DeleteFile", request)

    def delete_directory(self, path: PathArgument, recursive: bool = False) -> None:
        """Delete a directory; without ``recursive`` it must be empty."""
        request = pb.DeleteDirectoryRequest(
            sandbox_id=self.sandbox_id, recursive=recursive, **path_fields(path)
        )
        self._call("DeleteDirectory", request)

    def move(
        self, source: PathArgument, destination: PathArgument, *, overwrite: bool = True
    ) -> FileInfo:
        """Rename ``source`` to ``destination`` and return the destination's info."""
        request = pb.MoveRequest(
            sandbox_id=self.sandbox_id,
            overwrite=overwrite,
            **path_fields(source, "source"),
            **path_fields(destination, "destination"),
        )
        return info_from_proto(self._call("Move", request).file)

    def chmod(self, path: PathArgument, mode: int) -> FileInfo:
        """Set the permission bits of ``path``, for example 0o640."""
        request = pb.ChmodRequest(
            sandbox_id=self.sandbox_id, mode=check_mode(mode), **path_fields(path)
        )
        return info_from_proto(self._call("Chmod", request).file)

    # Search.

    def find_in_files(
        self, path: PathArgument, pattern: str, *, max_matches: int = MAX_MATCHES
    ) -> MatchList:
        """Return the lines of the files under ``path`` that match ``pattern``.

        ``pattern`` is a Python regular expression, applied to bytes. Binary
        files are skipped. The result's ``truncated`` is true when the search
        stopped at ``max_matches`` (at most 10000).
        """
        request = pb.FindInFilesRequest(
            sandbox_id=self.sandbox_id,
            pattern=pattern,
            max_matches=check_max_matches(max_matches),
            **path_fields(path),
        )
        result = MatchList()
        for response in self._stream("FindInFiles", request):
            result.extend(match_from_proto(match) for match in response.matches)
            result.truncated = result.truncated or response.truncated
        return result

    def replace_in_files(
        self, path: PathArgument, pattern: str, replacement: str
    ) -> list[str]:
        """Replace ``pattern`` in the files under ``path``; return the changed paths.

        ``replacement`` uses re.sub's syntax (\\1, \\g<name>). Files without a
        match are not touched, and changed files keep their mode and owner.
        """
        request = pb.ReplaceInFilesRequest(
            sandbox_id=self.sandbox_id,
            pattern=pattern,
            replacement=replacement,
            **path_fields(path),
        )
        return [
            _text(changed.path, changed.path_raw)
            for response in self._stream("ReplaceInFiles", request)
            for changed in response.files
        ]


class AsyncSandboxFileSystem:
    """``sb.fs`` of an AsyncSandboxInstance: SandboxFileSystem's methods, awaitable.

    Local file opens, reads and writes run in a thread (asyncio.to_thread),
    so a slow disk does not stall the event loop.
    """

    def __init__(self, client: AsyncClient, sandbox_id: str) -> None:
        self._client = client
        self.sandbox_id = sandbox_id
        self._stub = filesystem_pb2_grpc.FileServiceStub(client._channel)

    async def _call(self, method: str, request: Any) -> Any:
        self._client._check_open()
        try:
            return await getattr(self._stub, method)(request)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self._client.address) from None

    async def _stream(self, method: str, request: Any) -> AsyncIterator[Any]:
        self._client._check_open()
        call = getattr(self._stub, method)(request)
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            raise error_from_rpc(error, self._client.address) from None
        finally:
            call.cancel()

    async def upload_fileobj(
        self,
        fileobj: IO[bytes],
        remote_path: PathArgument,
        mode: int = 0o644,
        *,
        parents: bool = False,
        overwrite: bool = True,
    ) -> int:
        first = _upload_header(self.sandbox_id, remote_path, mode, parents, overwrite)
        failures = _RequestErrors()

        async def requests() -> AsyncIterator[pb.UploadFileRequest]:
            yield first
            size = 0
            try:
                while chunk := await asyncio.to_thread(fileobj.read, CHUNK_BYTES):
                    size += len(chunk)
                    yield pb.UploadFileRequest(data=chunk)
            except BaseException as error:
                failures.error = error
                raise
            yield pb.UploadFileRequest(end=pb.UploadFileEnd(size=size))

        try:
            reply = await self._call("UploadFile", requests())
        except errors.EngineError:
            if failures.error is not None:
                raise failures.error from None
            raise
        return reply.size

    async def upload_file(
        self,
        local_path: PathArgument,
        remote_path: PathArgument,
        mode: int = 0o644,
        *,
        parents: bool = False,
        overwrite: bool = True,
    ) -> None:
        file = await asyncio.to_thread(open, local_path, "rb")
        try:
            if self._client.local_admin:
                header = _upload_header(
                    self.sandbox_id, remote_path, mode, parents, overwrite
                )
                header.header.host_file.CopyFrom(_host_file(local_path, file.fileno()))
                end = pb.UploadFileRequest(end=pb.UploadFileEnd(size=0))

                async def requests() -> AsyncIterator[pb.UploadFileRequest]:
                    yield header
                    yield end

                try:
                    await self._call("UploadFile", requests())
                    return
                except (errors.FailedPrecondition, errors.PermissionDenied):
                    pass  # Another file under this path: stream instead.
            await self.upload_fileobj(
                file, remote_path, mode, parents=parents, overwrite=overwrite
            )
        finally:
            file.close()

    async def write_bytes(
        self,
        path: PathArgument,
        data: bytes | bytearray | memoryview,
        mode: int = 0o644,
        *,
        parents: bool = False,
    ) -> None:
        await self.upload_fileobj(io.BytesIO(data), path, mode, parents=parents)

    async def write_text(
        self,
        path: PathArgument,
        text: str,
        mode: int = 0o644,
        *,
        encoding: str = "utf-8",
        parents: bool = False,
    ) -> None:
        await self.write_bytes(path, text.encode(encoding), mode, parents=parents)

    async def _download(
        self, remote_path: PathArgument, write: Callable[[bytes], Awaitable[None]]
    ) -> int:
        request = pb.DownloadFileRequest(
            sandbox_id=self.sandbox_id, **path_fields(remote_path)
        )
        responses = self._stream("DownloadFile", request)
        try:
            header = _check_header(await anext(responses, None), remote_path)
            received = 0
            async for response in responses:
                data = response.data
                await write(data)
                received += len(data)
        finally:
            await responses.aclose()
        _check_received(received, header, remote_path)
        return received

    async def download_fileobj(
        self, remote_path: PathArgument, fileobj: IO[bytes]
    ) -> int:
        async def write(data: bytes) -> None:
            await asyncio.to_thread(fileobj.write, data)

        return await self._download(remote_path, write)

    async def download_file(
        self, remote_path: PathArgument, local_path: PathArgument
    ) -> None:
        temporary = _temporary_path(local_path)
        try:
            file = await asyncio.to_thread(_open_temporary, temporary)
            try:
                if not await self._download_to_host_file(remote_path, temporary, file):
                    await self.download_fileobj(remote_path, file)
            finally:
                file.close()
            await asyncio.to_thread(os.replace, temporary, local_path)
        except BaseException:
            if os.path.lexists(temporary):
                os.unlink(temporary)
            raise

    async def _download_to_host_file(
        self, remote_path: PathArgument, local_path: str, file: IO[bytes]
    ) -> bool:
        """Let the daemon write ``file`` itself; False if the caller must stream."""
        if not self._client.local_admin:
            return False
        request = pb.DownloadFileRequest(
            sandbox_id=self.sandbox_id,
            host_file=_host_file(local_path, file.fileno()),
            **path_fields(remote_path),
        )
        try:
            responses = [
                response async for response in self._stream("DownloadFile", request)
            ]
        except (errors.FailedPrecondition, errors.PermissionDenied):
            return False
        _check_header(responses[0] if responses else None, remote_path)
        return True

    async def read_bytes(self, path: PathArgument) -> bytes:
        parts: list[bytes] = []

        async def write(data: bytes) -> None:
            parts.append(data)

        await self._download(path, write)
        return b"".join(parts)

    async def read_text(
        self, path: PathArgument, *, encoding: str = "utf-8", errors: str = "strict"
    ) -> str:
        return (await self.read_bytes(path)).decode(encoding, errors)

    async def stat_file(self, path: PathArgument) -> FileInfo:
        request = pb.StatFileRequest(sandbox_id=self.sandbox_id, **path_fields(path))
        return info_from_proto((await self._call("StatFile", request)).file)

    async def list_files(self, path: PathArgument, recursive: bool = False) -> FileList:
        request = pb.ListFilesRequest(
            sandbox_id=self.sandbox_id, recursive=recursive, **path_fields(path)
        )
        result = FileList()
        async for response in self._stream("ListFiles", request):
            result.extend(info_from_proto(entry) for entry in response.files)
            result.truncated = result.truncated or response.truncated
        return result

    async def create_directory(
        self, path: PathArgument, mode: int = 0o755, parents: bool = True
    ) -> FileInfo:
        request = pb.CreateDirectoryRequest(
            sandbox_id=self.sandbox_id,
            mode=check_mode(mode),
            parents=parents,
            **path_fields(path),
        )
        return info_from_proto((await self._call("CreateDirectory", request)).file)

    async def delete_file(self, path: PathArgument) -> None:
        request = pb.DeleteFileRequest(sandbox_id=self.sandbox_id, **path_fields(path))
        await self._call("DeleteFile", request)

    async def delete_directory(
        self, path: PathArgument, recursive: bool = False
    ) -> None:
        request = pb.DeleteDirectoryRequest(
            sandbox_id=self.sandbox_id, recursive=recursive, **path_fields(path)
        )
        await self._call("DeleteDirectory", request)

    async def move(
        self, source: PathArgument, destination: PathArgument, *, overwrite: bool = True
    ) -> FileInfo:
        request = pb.MoveRequest(
            sandbox_id=self.sandbox_id,
            overwrite=overwrite,
            **path_fields(source, "source"),
            **path_fields(destination, "destination"),
        )
        return info_from_proto((await self._call("Move", request)).file)

    async def chmod(self, path: PathArgument, mode: int) -> FileInfo:
        request = pb.ChmodRequest(
            sandbox_id=self.sandbox_id, mode=check_mode(mode), **path_fields(path)
        )
        return info_from_proto((await self._call("Chmod", request)).file)

    async def find_in_files(
        self, path: PathArgument, pattern: str, *, max_matches: int = MAX_MATCHES
    ) -> MatchList:
        request = pb.FindInFilesRequest(
            sandbox_id=self.sandbox_id,
            pattern=pattern,
            max_matches=check_max_matches(max_matches),
            **path_fields(path),
        )
        result = MatchList()
        async for response in self._stream("FindInFiles", request):
            result.extend(match_from_proto(match) for match in response.matches)
            result.truncated = result.truncated or response.truncated
        return result

    async def replace_in_files(
        self, path: PathArgument, pattern: str, replacement: str
    ) -> list[str]:
        request = pb.ReplaceInFilesRequest(
            sandbox_id=self.sandbox_id,
            pattern=pattern,
            replacement=replacement,
            **path_fields(path),
        )
        changed: list[str] = []
        async for response in self._stream("ReplaceInFiles", request):
            changed.extend(_text(item.path, item.path_raw) for item in response.files)
        return changed
