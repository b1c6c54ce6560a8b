"""Build the daemon's grpc.aio server: its services, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine import direct
from engine.errors import FailedPrecondition, InvalidArgument, Unavailable
from engine.server import deployments as deployment_service
from engine.server import files as file_service
from engine.server.auth import AuthInterceptor, TokenLookup
from engine.server.direct import DirectServer
from engine.server.interceptor import ErrorInterceptor
from engine.server.secrets import SERVICE_NAME as SECRET_SERVICE_NAME
from engine.server.secrets import SecretServicer
from engine.server.servicer import SandboxServicer
from engine.server.volumes import SERVICE_NAME as VOLUME_SERVICE_NAME
from engine.server.volumes import VolumeServicer
from engine.v1 import sandbox_pb2, sandbox_pb2_grpc, secret_pb2_grpc, volume_pb2_grpc

if TYPE_CHECKING:
    from engine.core.engine import Engine

logger = logging.getLogger(__name__)

SERVICE_NAME = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name
# sockaddr_un.sun_path is 108 bytes on Linux, including the trailing NUL.
MAX_SOCKET_PATH_BYTES = 107
SOCKET_MODE = 0o600


class Server:
    """A grpc.aio server with the engine's services, plus its health servicer.

    ``addresses`` maps "unix" and "tcp" to the addresses bound, in the form
    that gRPC clients accept ("unix:/path", "host:port"). ``direct`` serves
    SandboxService on the unix socket's direct twin, when there is one.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        addresses: dict[str, str],
        socket_path: Path | None,
        direct_server: DirectServer | None = None,
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.addresses = addresses
        self.socket_path = socket_path
        self.direct = direct_server
        self._socket_inode: int | None = None
        if socket_path is not None:
            self._socket_inode = os.stat(socket_path).st_ino

    async def start(self) -> None:
        await self.server.start()
        if self.direct is not None:
            await self.direct.start()
        for service in (
            "",
            SERVICE_NAME,
            VOLUME_SERVICE_NAME,
            SECRET_SERVICE_NAME,
            file_service.SERVICE_NAME,
        ):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, stop the server and remove the socket file."""
        if self.direct is not None:
            # Before the first await, so that no call starts once the
            # daemon's shutdown begins to terminate sandboxes.
            self.direct.stopping = True
        await self.health.enter_graceful_shutdown()
        if self.direct is not None:
            await asyncio.gather(self.server.stop(grace), self.direct.stop(grace))
        else:
            await self.server.stop(grace)
        self.remove_socket()

    def remove_socket(self) -> None:
        """Remove the unix socket files, unless another process replaced them."""
        if self.direct is not None:
            self.direct.remove_socket()
        if self.socket_path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.socket_path).st_ino == self._socket_inode:
                os.unlink(self.socket_path)


def socket_accepts(path: Path) -> bool:
    """Return whether a process accepts connections on the unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        # A listener whose backlog is full still exists.
        return True
    finally:
        probe.close()
    return True


def prepare_socket_path(path: Path) -> None:
    """Check ``path`` for binding and remove a stale socket file there.

    Raises FailedPrecondition when another process accepts connections on the
    socket or the path exists and is not a socket, and InvalidArgument when the
    path is too long.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise InvalidArgument(
            f"invalid socket path {str(path)!r}: {len(os.fsencode(path))} bytes, but"
            f" unix socket paths are limited to {MAX_SOCKET_PATH_BYTES} bytes;"
            " choose a shorter --socket or --data-dir"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FailedPrecondition(
            f"{path} exists and is not a socket; remove it or choose another --socket"
        )
    if socket_accepts(path):
        raise FailedPrecondition(
            f"another engine daemon is running on {path}; stop it first, or start"
            " this one with another --data-dir or --socket"
        )
    logger.info("removing stale socket %s: no process accepts connections on it", path)
    os.unlink(path)


def _bind_unix(server: grpc.aio.Server, path: Path) -> str:
    prepare_socket_path(path)
    address = f"unix:{path}"
    # The umask keeps the socket private from the moment it exists. It applies
    # to the whole process, so bind before other threads create files.
    previous_umask = os.umask(0o177)
    try:
        server.add_insecure_port(address)
    except RuntimeError as error:
        raise Unavailable(f"failed to bind {address}: {error}") from error
    finally:
        os.umask(previous_umask)
    os.chmod(path, SOCKET_MODE)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode != SOCKET_MODE:
        raise FailedPrecondition(
            f"socket {path} has mode {mode:04o} after chmod, expected {SOCKET_MODE:04o}"
        )
    return address


def _bind_tcp(server: grpc.aio.Server, listen: str) -> str:
    host, separator, port_text = listen.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise InvalidArgument(
            f"invalid listen address {listen!r}: expected HOST:PORT,"
            " such as 127.0.0.1:7070"
        )
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as error:
        raise Unavailable(f"failed to listen on {listen}: {error}") from error
    if port == 0:
        raise Unavailable(f"failed to listen on {listen}")
    logger.info(
        "listening on TCP %s:%d; calls need a bearer token from `engine token create`",
        host,
        port,
    )
    return f"{host}:{port}"


def _token_lookup(engine: Engine) -> TokenLookup:
    def lookup(token: str) -> str | None:
        tokens = engine.tokens
        return tokens.workspace_of(token) if tokens is not None else None

    return lookup


# Largest request message the daemon accepts, in bytes.
MAX_REQUEST_BYTES = 16 * 1024 * 1024


def create_server(
    engine: Engine,
    *,
    socket_path: str | os.PathLike[str] | None = None,
    listen: str | None = None,
) -> tuple[Server, dict[str, str]]:
    """Create and bind, but do not start, a server for ``engine``.

    ``socket_path`` is a unix socket path, created with mode 0600. ``listen``
    is a TCP HOST:PORT, where port 0 picks a free port. At least one of the two
    is required. Returns the server and its bound addresses, as
    ``Server.addresses`` has them.
    """
    if socket_path is None and listen is None:
        raise InvalidArgument("a socket path or a TCP listen address is required")
    server = grpc.aio.server(
        # AuthInterceptor runs first, so ErrorInterceptor maps what it lets in.
        interceptors=[AuthInterceptor(_token_lookup(engine)), ErrorInterceptor()],
        # Above the engine's own 1 MiB limit on argv plus env, so that an
        # oversized exec gets the engine's message naming the field, not
        # gRPC's bare "message larger than max".
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
    )
    sandbox_servicer = SandboxServicer(engine)
    sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(sandbox_servicer, server)
    volume_pb2_grpc.add_VolumeServiceServicer_to_server(VolumeServicer(engine), server)
    secret_pb2_grpc.add_SecretServiceServicer_to_server(SecretServicer(engine), server)
    file_service.add_to_server(engine, server)
    deployment_service.add_to_server(engine, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            VOLUME_SERVICE_NAME,
            SECRET_SERVICE_NAME,
            file_service.SERVICE_NAME,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ],
        server,
    )

    addresses: dict[str, str] = {}
    path = Path(socket_path).absolute() if socket_path is not None else None
    direct_server = None
    if path is not None:
        addresses["unix"] = _bind_unix(server, path)
    try:
        if path is not None:
            direct_server = _bind_direct(engine, sandbox_servicer, path)
        if listen is not None:
            addresses["tcp"] = _bind_tcp(server, listen)
    except Exception:
        if direct_server is not None:
            direct_server.remove_socket()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    wrapper = Server(server, health_servicer, addresses, path, direct_server)
    return wrapper, addresses


def _bind_direct(
    engine: Engine, servicer: SandboxServicer, grpc_path: Path
) -> DirectServer | None:
    """Bind the direct socket next to the gRPC socket at ``grpc_path``.

    Returns None when the direct socket's longer path does not fit in a unix
    socket address. Clients then use gRPC alone.
    """
    path = Path(direct.socket_path_for(str(grpc_path)))
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        logger.info(
            "not serving the direct socket: its path %s is longer than %d bytes;"
            " clients use gRPC alone",
            path,
            MAX_SOCKET_PATH_BYTES,
        )
        return None
    server = DirectServer(servicer, _token_lookup(engine), MAX_REQUEST_BYTES)
    server.bind(path)
    return server
