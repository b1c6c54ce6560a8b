"""The FileService servicer: request checks, then one ``engine.files`` call per RPC.

``engine.core.files.SandboxFiles`` checks paths, modes and patterns and raises
``engine.errors`` classes that name the value, and ``ErrorInterceptor`` turns
those into gRPC statuses, as for every engine.v1 service.

Paths inside the engine are ``str`` values in which each byte that is not valid
UTF-8 is a lone surrogate (Python's "surrogateescape", as ``os.fsdecode``
returns it). Proto strings must be valid UTF-8, so a response carries such a
path as a string with U+FFFD plus its exact bytes in the ``*_raw`` field, and a
request may name it through its ``*_raw`` field.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message

from engine.core.files import MAX_MATCHES, FileInfo, Match
from engine.errors import InvalidArgument
from engine.server import hostfiles, validation
from engine.server.convert import timestamp_to_proto
from engine.v1 import filesystem_pb2 as pb
from engine.v1 import filesystem_pb2_grpc

if TYPE_CHECKING:
    from engine.core.engine import Engine
    from engine.core.files import SandboxFiles

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FileService"].full_name
SERVICE_PREFIX = f"/{SERVICE_NAME}/"
# Streamed lists are sent in messages of at most this many items and about
# this many bytes, well below the 4 MiB that gRPC clients accept by default.
BATCH_ITEMS = 1000
BATCH_BYTES = 1024 * 1024
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIRECTORY_MODE = 0o755

FILE_TYPES = {
    "file": pb.FILE_TYPE_FILE,
    "dir": pb.FILE_TYPE_DIRECTORY,
    "symlink": pb.FILE_TYPE_SYMLINK,
    "other": pb.FILE_TYPE_OTHER,
}

T = TypeVar("T", bound=Message)


def text_and_raw(value: str) -> tuple[str, bytes]:
    """Split an engine path into valid UTF-8 text and, if that lost bytes, the bytes."""
    raw = os.fsencode(value)
    try:
        return raw.decode("utf-8"), b""
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), raw


def request_path(message: Any, field: str = "path") -> str:
    """Return a request's path: ``<field>_raw`` when set, else ``<field>``."""
    raw: bytes = getattr(message, f"{field}_raw")
    if raw:
        return os.fsdecode(raw)
    return getattr(message, field)


def info_to_proto(info: FileInfo) -> pb.FileInfo:
    path, path_raw = text_and_raw(info.path)
    name, name_raw = text_and_raw(info.name)
    target, target_raw = text_and_raw(info.target)
    return pb.FileInfo(
        path=path,
        path_raw=path_raw,
        name=name,
        name_raw=name_raw,
        type=FILE_TYPES.get(info.type, pb.FILE_TYPE_OTHER),
        size=info.size,
        mode=info.mode,
        mtime=timestamp_to_proto(info.mtime),
        uid=info.uid,
        gid=info.gid,
        target=target,
        target_raw=target_raw,
    )


def match_to_proto(match: Match) -> pb.FileMatch:
    path, path_raw = text_and_raw(match.path)
    return pb.FileMatch(
        path=path,
        path_raw=path_raw,
        line=match.line,
        column=match.column,
        text=match.text,
    )


def changed_to_proto(changed: str) -> pb.ChangedFile:
    path, path_raw = text_and_raw(changed)
    return pb.ChangedFile(path=path, path_raw=path_raw)


def batches(messages: Iterable[T]) -> Iterator[list[T]]:
    """Group ``messages`` into lists of at most BATCH_ITEMS and about BATCH_BYTES.

    Always yields at least one list, which is empty when ``messages`` is.
    """
    batch: list[T] = []
    size = 0
    for message in messages:
        length = message.ByteSize()
        if batch and (len(batch) >= BATCH_ITEMS or size + length > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(message)
        size += length
    yield batch


class FileServicer(filesystem_pb2_grpc.FileServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def _files(self) -> SandboxFiles:
        # Looked up per call, so a stand-in Engine without files still serves
        # the other services.
        return self._engine.files

    async def UploadFile(
        self,
        request_iterator: AsyncIterator[pb.UploadFileRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadFileResponse:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("message") != "header":
            raise InvalidArgument(
                "invalid UploadFile stream: the first request must carry the header"
                " (sandbox_id, path, mode), and only the later ones data"
            )
        header = first.header
        validation.check_sandbox_id(header.sandbox_id)
        path = request_path(header)
        mode = header.mode if header.HasField("mode") else DEFAULT_FILE_MODE
        overwrite = header.overwrite if header.HasField("overwrite") else True
        if header.HasField("host_file"):
            source = hostfiles.open_host_file(header.host_file, write=False)
            async for _ in requests:
                pass
            size = await self._files.write_file(
                header.sandbox_id,
                path,
                hostfiles.read_chunks(source),
                mode=mode,
                parents=header.parents,
                overwrite=overwrite,
            )
            return pb.UploadFileResponse(size=size)

        async def data() -> AsyncIterator[bytes]:
            received = 0
            async for message in requests:
                kind = message.WhichOneof("message")
                if kind == "header":
                    raise InvalidArgument(
                        f"invalid UploadFile stream for {path!r}: a second header;"
                        " only the first request may carry one"
                    )
                if kind == "end":
                    if message.end.size != received:
                        raise InvalidArgument(
                            f"invalid UploadFile stream for {path!r}: the end"
                            f" request says {message.end.size} bytes, but the"
                            f" stream carried {received}; nothing was written"
                        )
                    return
                # Each access of a bytes field copies it (upb), so read it once.
                data = message.data
                if data:
                    received += len(data)
                    yield data
            # Raising makes write_file discard what it received.
            raise InvalidArgument(
                f"UploadFile stream for {path!r} ended without its end request,"
                " as when the client cancels it; nothing was written"
            )

        size = await self._files.write_file(
            header.sandbox_id,
            path,
            data(),
            mode=mode,
            parents=header.parents,
            overwrite=overwrite,
        )
        logger.debug(
            "uploaded %d bytes to %r in sandbox %s", size, path, header.sandbox_id
        )
        return pb.UploadFileResponse(size=size)

    async def DownloadFile(
        self, request: pb.DownloadFileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadFileResponse]:
        validation.check_sandbox_id(request.sandbox_id)
        target = None
        if request.HasField("host_file"):
            target = hostfiles.open_host_file(request.host_file, write=True)
        try:
            content = await self._files.read_file(
                request.sandbox_id, request_path(request)
            )
        except BaseException:
            if target is not None:
                os.close(target)
            raise
        if target is not None:
            await hostfiles.write_content(target, content)
            yield pb.DownloadFileResponse(
                header=pb.DownloadFileHeader(size=content.size, mode=content.mode)
            )
            return
        async with contextlib.aclosing(content.chunks) as chunks:
            yield pb.DownloadFileResponse(
                header=pb.DownloadFileHeader(size=content.size, mode=content.mode)
            )
            async for chunk in chunks:
                yield pb.DownloadFileResponse(data=chunk)

    async def StatFile(
        self, request: pb.StatFileRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatFileResponse:
        validation.check_sandbox_id(request.sandbox_id)
        info = await self._files.stat_file(request.sandbox_id, request_path(request))
        return pb.StatFileResponse(file=info_to_proto(info))

    async def ListFiles(
        self, request: pb.ListFilesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ListFilesResponse]:
        validation.check_sandbox_id(request.sandbox_id)
        entries, truncated = await self._files.list_files(
            request.sandbox_id, request_path(request), recursive=request.recursive
        )
        groups = list(batches(info_to_proto(entry) for entry in entries))
        for index, group in enumerate(groups):
            last = index == len(groups) - 1
            yield pb.ListFilesResponse(files=group, truncated=truncated and last)

    async def CreateDirectory(
        self, request: pb.CreateDirectoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateDirectoryResponse:
        validation.check_sandbox_id(request.sandbox_id)
        mode = request.mode if request.HasField("mode") else DEFAULT_DIRECTORY_MODE
        parents = request.parents if request.HasField("parents") else True
        info = await self._files.make_directory(
            request.sandbox_id, request_path(request), mode=mode, parents=parents
        )
        return pb.CreateDirectoryResponse(file=info_to_proto(info))

    async def DeleteFile(
        self, request: pb.DeleteFileRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteFileResponse:
        validation.check_sandbox_id(request.sandbox_id)
        await self._files.delete_file(request.sandbox_id, request_path(request))
        return pb.DeleteFileResponse()

    async def DeleteDirectory(
        self, request: pb.DeleteDirectoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDirectoryResponse:
        validation.check_sandbox_id(request.sandbox_id)
        await self._files.delete_directory(
            request.sandbox_id, request_path(request), recursive=request.recursive
        )
        return pb.DeleteDirectoryResponse()

    async def Move(
        self, request: pb.MoveRequest, context: grpc.aio.ServicerContext
    ) -> pb.MoveResponse:
        validation.check_sandbox_id(request.sandbox_id)
        overwrite = request.overwrite if request.HasField("overwrite") else True
        info = await self._files.move(
            request.sandbox_id,
            request_path(request, "source"),
            request_path(request, "destination"),
            overwrite=overwrite,
        )
        return pb.MoveResponse(file=info_to_proto(info))

    async def Chmod(
        self, request: pb.ChmodRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChmodResponse:
        validation.check_sandbox_id(request.sandbox_id)
        if not request.HasField("mode"):
            raise InvalidArgument(
                "missing mode: set the permission bits, from 0 to 0o7777"
            )
        info = await self._files.chmod(
            request.sandbox_id, request_path(request), request.mode
        )
        return pb.ChmodResponse(file=info_to_proto(info))

    async def FindInFiles(
        self, request: pb.FindInFilesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FindInFilesResponse]:
        validation.check_sandbox_id(request.sandbox_id)
        matches, truncated = await self._files.find_in_files(
            request.sandbox_id,
            request_path(request),
            request.pattern,
            max_matches=request.max_matches or MAX_MATCHES,
        )
        groups = list(batches(match_to_proto(match) for match in matches))
        for index, group in enumerate(groups):
            last = index == len(groups) - 1
            yield pb.FindInFilesResponse(matches=group, truncated=truncated and last)

    async def ReplaceInFiles(
        self, request: pb.ReplaceInFilesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ReplaceInFilesResponse]:
        validation.check_sandbox_id(request.sandbox_id)
        changed = await self._files.replace_in_files(
            request.sandbox_id,
            request_path(request),
            request.pattern,
            request.replacement,
        )
        for group in batches(changed_to_proto(path) for path in changed):
            yield pb.ReplaceInFilesResponse(files=group)


def add_to_server(engine: Engine, server: grpc.aio.Server) -> None:
    """Register FileService on ``server``; its errors map through ErrorInterceptor."""
    filesystem_pb2_grpc.add_FileServiceServicer_to_server(FileServicer(engine), server)
