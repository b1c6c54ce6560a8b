"""Transfers between a sandbox and a file on the daemon's host, for local clients.

A client on the unix socket without a token is the host's root, so it may as
well let the daemon read or write a host file itself. The bytes then move
between the file and the sandbox's file worker inside the daemon. They never
pass through gRPC messages, whose cost bounds a streamed transfer.
The client names the file by path and by the device and inode numbers it read
with stat(2). The daemon checks both, so a client in another mount namespace,
whose path would name a different file here, gets FAILED_PRECONDITION and
falls back to streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator

from engine.core.files import CHUNK_BYTES, FileContent
from engine.core.tenancy import is_local_admin
from engine.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from engine.v1 import filesystem_pb2 as pb

# Bytes read from a host file at a time for an upload.
READ_BYTES = 4 * CHUNK_BYTES


def open_host_file(host_file: pb.HostFile, *, write: bool) -> int:
    """Open the client's file and check that it is the one the client named."""
    if not is_local_admin():
        raise PermissionDenied(
            "host_file is only for callers on the unix socket without a token;"
            " stream the file's bytes instead"
        )
    if not os.path.isabs(host_file.path):
        raise InvalidArgument(
            f"invalid host_file path {host_file.path!r}: expected an absolute path"
        )
    flags = (os.O_WRONLY if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(host_file.path, flags | os.O_NONBLOCK)
    except OSError as error:
        raise FailedPrecondition(
            f"cannot open host file {host_file.path!r}: {error.strerror}"
        ) from None
    status = os.fstat(fd)
    same = (status.st_dev, status.st_ino) == (host_file.device, host_file.inode)
    if not stat.S_ISREG(status.st_mode) or not same:
        os.close(fd)
        raise FailedPrecondition(
            f"host file {host_file.path!r} is not the regular file the client"
            " named (device and inode differ); stream the file's bytes instead"
        )
    os.set_blocking(fd, True)
    return fd


async def read_chunks(fd: int) -> AsyncIterator[bytes]:
    """Yield the bytes of ``fd`` from its start, and close it at the end."""
    try:
        while chunk := await asyncio.to_thread(os.read, fd, READ_BYTES):
            yield chunk
    finally:
        os.close(fd)


async def write_content(fd: int, content: FileContent) -> int:
    """Truncate ``fd``, write ``content`` to it and close it; return the size."""
    written = 0
    try:
        os.ftruncate(fd, 0)
        async with contextlib.aclosing(content.chunks) as chunks:
            async for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                written += len(chunk)
    finally:
        os.close(fd)
    return written
