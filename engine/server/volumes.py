"""The VolumeService servicer and the conversions of its messages.

File system work runs in worker threads (``asyncio.to_thread``), so a large
upload, download or walk never stalls the daemon's event loop. Creating,
listing and deleting volumes go through the Engine, which tracks the
sandboxes that mount each volume.

Methods raise ``engine.errors`` classes, and ``ErrorInterceptor`` maps them to
gRPC statuses as it does for every engine.v1 service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from engine.errors import InvalidArgument
from engine.server import convert
from engine.server.convert import timestamp_from_proto, timestamp_to_proto
from engine.storage.volumes import (
    CHUNK_BYTES,
    DEFAULT_LIST_LIMIT,
    PathInfo,
    PathType,
    VolumeInfo,
)
from engine.v1 import volume_pb2 as pb
from engine.v1 import volume_pb2_grpc

if TYPE_CHECKING:
    from engine.core.engine import Engine

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VolumeService"].full_name
DEFAULT_UPLOAD_MODE = 0o644

PATH_TYPES: dict[PathType, int] = {
    PathType.FILE: pb.VOLUME_PATH_TYPE_FILE,
    PathType.DIRECTORY: pb.VOLUME_PATH_TYPE_DIRECTORY,
    PathType.SYMLINK: pb.VOLUME_PATH_TYPE_SYMLINK,
    PathType.OTHER: pb.VOLUME_PATH_TYPE_OTHER,
}
PATH_TYPES_FROM_PROTO: dict[int, PathType] = {
    value: key for key, value in PATH_TYPES.items()
}


# ------------------------------------------------------------- conversions


def volume_to_proto(info: VolumeInfo) -> pb.Volume:
    message = pb.Volume(
        name=info.name,
        created_at=timestamp_to_proto(info.created_at),
        sandbox_ids=list(info.sandbox_ids),
        url=info.url,
    )
    if info.size_bytes is not None:
        message.size_bytes = info.size_bytes
    if info.file_count is not None:
        message.file_count = info.file_count
    return message


def volume_from_proto(message: pb.Volume) -> VolumeInfo:
    return VolumeInfo(
        name=message.name,
        created_at=timestamp_from_proto(message.created_at),
        size_bytes=message.size_bytes if message.HasField("size_bytes") else None,
        file_count=message.file_count if message.HasField("file_count") else None,
        sandbox_ids=tuple(message.sandbox_ids),
        url=message.url,
    )


def path_to_proto(info: PathInfo) -> pb.VolumePath:
    return pb.VolumePath(
        path=info.path,
        type=PATH_TYPES[info.type],
        size=info.size,
        mode=info.mode,
        modified_at=timestamp_to_proto(info.mtime),
        symlink_target=info.target,
    )


def path_from_proto(message: pb.VolumePath) -> PathInfo:
    return PathInfo(
        path=message.path,
        type=PATH_TYPES_FROM_PROTO.get(message.type, PathType.OTHER),
        size=message.size,
        mode=message.mode,
        mtime=timestamp_from_proto(message.modified_at),
        target=message.symlink_target,
    )


# ---------------------------------------------------------------- servicer


class VolumeServicer(volume_pb2_grpc.VolumeServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _run(self, function: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.to_thread(function, *args)

    async def Create(
        self, request: pb.VolumeCreateRequest, context: grpc.aio.ServicerContext
    ) -> pb.VolumeCreateResponse:
        s3 = None
        if request.HasField("s3"):
            s3 = convert.bucket_config_from_proto(request.s3)
        info, created = await self._engine.create_volume(request.name, request.url, s3)
        if created:
            logger.info("created volume %s", info.name)
        return pb.VolumeCreateResponse(volume=volume_to_proto(info), created=created)

    async def List(
        self, request: pb.VolumeListRequest, context: grpc.aio.ServicerContext
    ) -> pb.VolumeListResponse:
        infos = await self._engine.list_volumes()
        return pb.VolumeListResponse(volumes=[volume_to_proto(i) for i in infos])

    async def Delete(
        self, request: pb.VolumeDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.VolumeDeleteResponse:
        await self._engine.delete_volume(request.name)
        logger.info("deleted volume %s", request.name)
        return pb.VolumeDeleteResponse()

    async def ListPath(
        self, request: pb.VolumeListPathRequest, context: grpc.aio.ServicerContext
    ) -> pb.VolumeListPathResponse:
        limit = request.limit or DEFAULT_LIST_LIMIT
        entries, truncated = await self._run(
            self._engine.volumes.list_path, request.volume, request.pattern, limit
        )
        return pb.VolumeListPathResponse(
            paths=[path_to_proto(entry) for entry in entries], truncated=truncated
        )

    async def StatPath(
        self, request: pb.VolumeStatPathRequest, context: grpc.aio.ServicerContext
    ) -> pb.VolumeStatPathResponse:
        info = await self._run(
            self._engine.volumes.stat_path, request.volume, request.path
        )
        return pb.VolumeStatPathResponse(path=path_to_proto(info))

    async def Upload(
        self,
        request_iterator: AsyncIterator[pb.VolumeUploadRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.VolumeUploadResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("content") != "header":
            raise InvalidArgument(
                "invalid Upload stream: the first message must carry the header"
                " with the volume and the path"
            )
        header = first.header
        mode = header.mode if header.HasField("mode") else DEFAULT_UPLOAD_MODE
        upload = await self._run(
            self._engine.volumes.open_upload, header.volume, header.path, mode
        )
        try:
            async for message in request_iterator:
                if message.WhichOneof("content") == "header":
                    raise InvalidArgument(
                        "invalid Upload stream: only the first message may carry"
                        " a header"
                    )
                if message.data:
                    await self._run(upload.write, message.data)
            info = await self._run(upload.commit)
        except BaseException:
            # Synchronous, so that it also runs when the call is cancelled.
            upload.abort()
            raise
        logger.info(
            "uploaded %d bytes to /%s in volume %s",
            upload.size,
            info.path,
            header.volume,
        )
        return pb.VolumeUploadResponse(path=path_to_proto(info))

    async def Download(
        self, request: pb.VolumeDownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.VolumeDownloadResponse]:
        download = await self._run(
            self._engine.volumes.open_download, request.volume, request.path
        )
        try:
            yield pb.VolumeDownloadResponse(path=path_to_proto(download.info))
            while data := await self._run(download.read, CHUNK_BYTES):
                yield pb.VolumeDownloadResponse(data=data)
        finally:
            download.close()

    async def MovePath(
        self, request: pb.VolumeMovePathRequest, context: grpc.aio.ServicerContext
    ) -> pb.VolumeMovePathResponse:
        info = await self._run(
            self._engine.volumes.move_path,
            request.volume,
            request.source,
            request.destination,
        )
        return pb.VolumeMovePathResponse(path=path_to_proto(info))

    async def CopyPath(
        self, request: pb.VolumeCopyPathRequest, context: grpc.aio.ServicerContext
    ) -> pb.VolumeCopyPathResponse:
        info = await self._run(
            self._engine.volumes.copy_path,
            request.volume,
            request.source,
            request.destination,
        )
        return pb.VolumeCopyPathResponse(path=path_to_proto(info))

    async def DeletePath(
        self, request: pb.VolumeDeletePathRequest, context: grpc.aio.ServicerContext
    ) -> pb.VolumeDeletePathResponse:
        deleted = await self._run(
            self._engine.volumes.delete_path, request.volume, request.pattern
        )
        return pb.VolumeDeletePathResponse(paths=deleted)
