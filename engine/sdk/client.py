"""The SDK's connection to a daemon: address lookup, the channel and error mapping.

Every gRPC error that reaches SDK code passes through ``error_from_rpc``, which
turns a status code back into the ``engine.errors`` class the daemon raised.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from engine import direct, errors
from engine.config import default_socket_path
from engine.sdk.direct import ChannelBase, DirectChannel, DirectUnreachable
from engine.v1 import sandbox_pb2_grpc

logger = logging.getLogger(__name__)

ADDRESS_ENVIRONMENT_VARIABLE = "ENGINE_ADDRESS"
TOKEN_ENVIRONMENT_VARIABLE = "ENGINE_TOKEN"
# Same key as engine.server.interceptor.ERROR_METADATA_KEY, repeated here so
# the SDK does not import the server.
ERROR_METADATA_KEY = "engine-error"


def normalize_address(address: str) -> str:
    """Return a gRPC target: "unix:/path" for paths, "host:port" unchanged."""
    if address.startswith("unix:"):
        return address
    if address.startswith("/"):
        return f"unix:{address}"
    return address


def resolve_address(
    address: str | None = None, data_dir: str | os.PathLike[str] | None = None
) -> str:
    """Return the daemon address to use.

    In order: ``address``, the ENGINE_ADDRESS environment variable, then the
    default socket of ``data_dir`` (or of the default data dir).
    """
    if address:
        return normalize_address(address)
    from_environment = os.environ.get(ADDRESS_ENVIRONMENT_VARIABLE)
    if from_environment:
        return normalize_address(from_environment)
    path = default_socket_path(
        Path(data_dir).absolute() if data_dir is not None else None
    )
    return f"unix:{path}"


def resolve_token(token: str | None = None) -> str | None:
    """Return ``token``, else the ENGINE_TOKEN environment variable, else None."""
    return token or os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None


def is_local_admin(address: str, token: str | None = None) -> bool:
    """Return whether a client at ``address`` acts as the host's root.

    That is a client on the unix socket without a token, whose file transfers
    may let the daemon read and write its files directly.
    """
    return address.startswith("unix:") and resolve_token(token) is None


def _with_token(metadata: Any, token: str) -> list[tuple[str, str]]:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        (
            "method",
            "timeout",
            "metadata",
            "credentials",
            "wait_for_ready",
            "compression",
        ),
    ),
    grpc.ClientCallDetails,
):
    """ClientCallDetails with its fields settable, as grpc leaves it abstract."""


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` metadata to every call."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            _with_token(details.metadata, self._token),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Any, details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Any, details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Any, details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(
        self, continuation: Any, details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)


class _AsyncBearerToken(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """The grpc.aio form of _BearerToken."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(
        self, details: grpc.aio.ClientCallDetails
    ) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            _with_token(details.metadata, self._token),
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(
        self, continuation: Any, details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(
        self, continuation: Any, details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


def open_aio_channel(address: str, token: str | None = None) -> grpc.aio.Channel:
    """Open a grpc.aio channel that sends ``token``, or ENGINE_TOKEN, if set."""
    token = resolve_token(token)
    interceptors = [_AsyncBearerToken(token)] if token is not None else None
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


def open_channel(
    address: str, token: str | None = None, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """Open a channel to ``address`` that sends ``token``, or ENGINE_TOKEN, if set."""
    channel = grpc.insecure_channel(address, options=options)
    token = resolve_token(token)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _BearerToken(token))


def _is_engine_status(error: grpc.RpcError) -> bool:
    trailing = (
        error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    )
    return any(key == ERROR_METADATA_KEY for key, _ in trailing or ())


def error_from_rpc(error: grpc.RpcError, address: str) -> errors.EngineError:
    """Convert a gRPC error into the matching ``engine.errors`` exception."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code == grpc.StatusCode.UNAVAILABLE and not _is_engine_status(error):
        hint = (
            "check that a daemon listens there (ENGINE_ADDRESS is set)"
            if os.environ.get("ENGINE_ADDRESS")
            else "set ENGINE_ADDRESS to the address of a running daemon"
        )
        return errors.Unavailable(
            f"cannot connect to the engine daemon at {address}: {details}. Start one"
            f" with `engine serve`, or {hint}"
        )
    if code == grpc.StatusCode.CANCELLED and not _is_engine_status(error):
        return errors.Unavailable(
            f"the call to the engine daemon at {address} was cancelled"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not _is_engine_status(error):
        return errors.DeadlineExceeded(
            f"the engine daemon at {address} did not reply in time: {details}"
        )
    cls = errors.BY_CODE.get(code.name, errors.InternalError)
    return cls(details)


class Client:
    """A channel to one daemon and its SandboxService stub.

    On a unix socket address, ``call`` and ``stream`` go through the daemon's
    direct socket (see engine.direct) while it accepts connections, and
    through gRPC otherwise; ``direct=False`` keeps every call on gRPC. The
    Client is thread-safe, so one Client may serve many threads.
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        direct: bool = True,
    ) -> None:
        self.address = resolve_address(address)
        self._channel = open_channel(self.address, token)
        self.local_admin = is_local_admin(self.address, token)
        self._closed = False
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(self._channel)
        self.direct = open_direct(DirectChannel, self.address, token, direct)

    def _check_open(self) -> None:
        if self._closed:
            raise errors.FailedPrecondition(
                f"the connection to the engine daemon at {self.address} is closed;"
                " attach again with Sandbox.connect(sandbox_id)"
            )

    def call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """Call a unary RPC and raise ``engine.errors`` classes on failure."""
        self._check_open()
        if self.direct is not None:
            try:
                return self.direct.call(method, request, timeout)
            except DirectUnreachable:
                pass
        try:
            return getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        """Iterate a server-streaming RPC, cancelling it when the iterator is closed."""
        self._check_open()
        if self.direct is not None:
            try:
                responses = self.direct.start_stream(method, request)
            except DirectUnreachable:
                pass
            else:
                with contextlib.closing(responses):
                    yield from responses
                return
        call = getattr(self.stub, method)(request)
        try:
            yield from call
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None
        finally:
            call.cancel()

    def open_stream(self, method: str, request: Any) -> Any:
        """Start a server-streaming RPC and return the call, to read and cancel."""
        self._check_open()
        return getattr(self.stub, method)(request)

    def close(self) -> None:
        self._closed = True
        if self.direct is not None:
            self.direct.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


ChannelT = TypeVar("ChannelT", bound=ChannelBase)


def open_direct(
    channel_class: type[ChannelT], address: str, token: str | None, enabled: bool
) -> ChannelT | None:
    """Return a ``channel_class`` to the direct socket of a unix ``address``.

    Returns None when ``enabled`` is False or ``address`` is not a unix socket.
    """
    if not enabled or not address.startswith("unix:"):
        return None
    path = direct.socket_path_for(address.removeprefix("unix:"))
    return channel_class(path, resolve_token(token), address)


def check_health(address: str, timeout: float = 2.0) -> bool:
    """Return whether a daemon at ``address`` reports SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(normalize_address(address)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
