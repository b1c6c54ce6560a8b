"""Volumes in the SDK: ``Volume`` to mount one, ``VolumeClient`` to manage them.

    from engine import Sandbox, Volume
    from engine.sdk.volumes import VolumeClient

    with Sandbox(volumes=[Volume("cache", "/root/cache")]).create() as sb:
        sb.process.exec("sh", "-c", "date > /root/cache/stamp").wait()

    with VolumeClient() as volumes:
        volumes.read_bytes("cache", "stamp")     # b"Tue ...\\n"
        volumes.list()                           # [VolumeInfo(name="cache", ...)]

A volume is created the first time a sandbox mounts it, or by
``VolumeClient.create``. Its files stay until the volume is deleted, across
sandboxes and daemon restarts. Paths are relative to the volume's root.

Every method raises the classes of ``engine.errors``: NotFound for an unknown
volume or path, InvalidArgument for a bad name or path, FailedPrecondition for
deleting a volume that a sandbox mounts, Unavailable when no daemon accepts
connections at the address.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from engine import errors
from engine.core.models import CloudBucketConfig
from engine.sdk.client import error_from_rpc, open_channel, resolve_address
from engine.server.convert import bucket_config_to_proto
from engine.server.volumes import path_from_proto, volume_from_proto
from engine.storage.volumes import CHUNK_BYTES, PathInfo, VolumeInfo
from engine.v1 import sandbox_pb2, volume_pb2_grpc
from engine.v1 import volume_pb2 as pb

logger = logging.getLogger(__name__)

__all__ = ["PathInfo", "Volume", "VolumeClient", "VolumeInfo"]


@dataclass(frozen=True)
class Volume:
    """A named volume to mount at ``mount_path``, an absolute path in the sandbox.

    Pass it as ``Sandbox(volumes=[Volume("data", "/data")])``. With
    ``read_only``, writes inside the sandbox fail with EROFS.
    """

    name: str
    mount_path: str
    read_only: bool = False

    def to_proto(self) -> sandbox_pb2.VolumeMount:
        return sandbox_pb2.VolumeMount(
            name=self.name, mount_path=self.mount_path, read_only=self.read_only
        )


def _chunks(file: IO[bytes]) -> Iterator[bytes]:
    while data := file.read(CHUNK_BYTES):
        yield data


class VolumeClient:
    """A channel to one daemon's VolumeService. It is thread-safe.

    ``address`` is "unix:/path" or "host:port"; without it, ENGINE_ADDRESS or
    the default socket is used.
    """

    def __init__(self, address: str | None = None, token: str | None = None) -> None:
        self.address = resolve_address(address)
        self._channel = open_channel(self.address, token)
        self.stub = volume_pb2_grpc.VolumeServiceStub(self._channel)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VolumeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Volumes.

    def create(
        self, name: str, *, url: str = "", s3: CloudBucketConfig | None = None
    ) -> VolumeInfo:
        """Create volume ``name``, or return it if it exists.

        ``url`` backs the volume with an fsspec file system instead of a local
        directory: "s3://BUCKET/PREFIX" (with ``s3`` naming the endpoint and
        the secrets of the keys) or "memory://NAME" for tests.
        """
        request = pb.VolumeCreateRequest(name=name, url=url)
        if s3 is not None:
            request.s3.CopyFrom(bucket_config_to_proto(s3))
        reply = self._call("Create", request)
        return volume_from_proto(reply.volume)

    def list(self) -> list[VolumeInfo]:
        """Return every volume with its size, file count and current sandboxes."""
        reply = self._call("List", pb.VolumeListRequest())
        return [volume_from_proto(volume) for volume in reply.volumes]

    def delete(self, name: str) -> None:
        """Delete volume ``name`` and its files; no sandbox may mount it."""
        self._call("Delete", pb.VolumeDeleteRequest(name=name))

    # Paths inside a volume.

    def list_path(
        self, name: str, pattern: str = "", *, limit: int = 0
    ) -> tuple[list[PathInfo], bool]:
        """Return the entries a path or glob names, and whether some were left off.

        A directory path lists its entries. Glob patterns such as "*.txt" or
        "logs/**" match one component at a time, and "**" matches any number
        of them. ``limit`` 0 means the daemon's default of 10000 entries.
        """
        request = pb.VolumeListPathRequest(volume=name, pattern=pattern, limit=limit)
        reply = self._call("ListPath", request)
        return [path_from_proto(path) for path in reply.paths], reply.truncated

    def stat(self, name: str, path: str) -> PathInfo:
        """Return the entry at ``path``; a symlink is reported, not followed."""
        reply = self._call("StatPath", pb.VolumeStatPathRequest(volume=name, path=path))
        return path_from_proto(reply.path)

    def upload(
        self, name: str, path: str, chunks: Iterable[bytes], *, mode: int = 0o644
    ) -> PathInfo:
        """Write the bytes of ``chunks`` to ``path``; readers never see a partial file.

        Missing parent directories are created, and an existing file is
        replaced. Chunks longer than 1 MiB are split.
        """

        def requests() -> Iterator[pb.VolumeUploadRequest]:
            header = pb.VolumeUploadHeader(volume=name, path=path, mode=mode)
            yield pb.VolumeUploadRequest(header=header)
            for chunk in chunks:
                view = memoryview(chunk)
                for start in range(0, len(view), CHUNK_BYTES):
                    data = bytes(view[start : start + CHUNK_BYTES])
                    yield pb.VolumeUploadRequest(data=data)

        reply = self._call("Upload", requests())
        return path_from_proto(reply.path)

    def write_bytes(
        self, name: str, path: str, data: bytes, *, mode: int = 0o644
    ) -> PathInfo:
        return self.upload(name, path, [data], mode=mode)

    def upload_file(
        self,
        name: str,
        local: str | os.PathLike[str],
        path: str,
        *,
        mode: int | None = None,
    ) -> PathInfo:
        """Upload the local file ``local`` to ``path``, keeping its mode by default."""
        with open(local, "rb") as file:
            if mode is None:
                mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode) & 0o777
            return self.upload(name, path, _chunks(file), mode=mode)

    def iter_bytes(self, name: str, path: str) -> Iterator[bytes]:
        """Yield the bytes of the regular file ``path`` as they arrive."""
        call = self.stub.Download(pb.VolumeDownloadRequest(volume=name, path=path))
        try:
            for message in call:
                if message.data:
                    yield message.data
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None
        finally:
            call.cancel()

    def read_bytes(self, name: str, path: str) -> bytes:
        return b"".join(self.iter_bytes(name, path))

    def download_file(
        self, name: str, path: str, local: str | os.PathLike[str]
    ) -> Path:
        """Download ``path`` to the local file ``local``, replacing it when complete."""
        target = Path(local)
        handle, temp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
        try:
            with (
                os.fdopen(handle, "wb") as file,
                contextlib.closing(self.iter_bytes(name, path)) as chunks,
            ):
                for data in chunks:
                    file.write(data)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return target

    def move(self, name: str, source: str, destination: str) -> PathInfo:
        """Rename ``source``; a directory ``destination`` receives it, as with mv."""
        request = pb.VolumeMovePathRequest(
            volume=name, source=source, destination=destination
        )
        return path_from_proto(self._call("MovePath", request).path)

    def copy(self, name: str, source: str, destination: str) -> PathInfo:
        """Copy a file or directory tree; a directory ``destination`` receives it."""
        request = pb.VolumeCopyPathRequest(
            volume=name, source=source, destination=destination
        )
        return path_from_proto(self._call("CopyPath", request).path)

    def delete_path(self, name: str, pattern: str) -> list[str]:
        """Delete what a path or glob names, directories with their contents.

        Returns the paths deleted. The volume's root cannot be deleted: use
        ``delete`` for the volume, or the pattern "*" for everything in it.
        """
        request = pb.VolumeDeletePathRequest(volume=name, pattern=pattern)
        return list(self._call("DeletePath", request).paths)


def check_volumes(volumes: Iterable[Any]) -> list[Volume]:
    """Return ``volumes`` as a list; raise InvalidArgument for an item not a Volume."""
    result = []
    for item in volumes:
        if not isinstance(item, Volume):
            raise errors.InvalidArgument(
                f"invalid volume {item!r}: expected engine.Volume(name, mount_path)"
            )
        result.append(item)
    return result
