"""The one place where exceptions become gRPC status codes.

``ErrorInterceptor`` wraps every SandboxService method. An
``engine.errors.EngineError`` becomes the status its ``code`` attribute names,
with the exception's message as the details. Any other exception becomes
INTERNAL with a generic message and an error id, and its traceback goes only to
the daemon's log under that id. A request that protobuf cannot decode becomes
INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from engine.errors import EngineError, InvalidArgument

logger = logging.getLogger(__name__)

# Every service of the engine's own API; health and reflection are others.
SERVICE_PREFIX = "/engine.v1."
# Trailing metadata key set on every status that the engine sent on purpose.
# Its value is the exception class name, such as "NotFound". The SDK uses it to
# tell an engine error from a transport failure with the same status code.
ERROR_METADATA_KEY = "engine-error"


class UndecodableRequest:
    """Stand-in for a request whose bytes protobuf rejected."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _wrap_deserializer(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return UndecodableRequest(error)

    return deserialize


def _subject(method: str, request: Any) -> str:
    """Name what a request is about, for logs: its sandbox, volume or secret.

    Only names are read, so a secret's value never reaches the log.
    """
    sandbox_id = getattr(request, "sandbox_id", "")
    if sandbox_id:
        return f"sandbox {sandbox_id}"
    if method.startswith("SecretService."):
        return f"secret {getattr(request, 'name', '') or '-'}"
    volume = getattr(request, "volume", "") or getattr(request, "name", "")
    if volume:
        return f"volume {volume}"
    return "-"


def status_of(
    method: str, request: Any, error: BaseException
) -> tuple[grpc.StatusCode, str, str]:
    """Log ``error`` and return the status code, details and error class that report it.

    An EngineError keeps its message. Any other exception is logged with its
    traceback under a new error id, and only that id reaches the caller.
    """
    subject = _subject(method, request)
    if isinstance(error, EngineError):
        code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)
        logger.info("%s for %s failed: %s: %s", method, subject, code.name, error)
        return code, str(error), type(error).__name__
    error_id = uuid.uuid4().hex[:12]
    logger.error(
        "%s for %s failed with internal error %s",
        method,
        subject,
        error_id,
        exc_info=error,
    )
    details = f"internal error {error_id} in the engine daemon; its log has the details"
    return grpc.StatusCode.INTERNAL, details, "InternalError"


async def _abort(
    context: grpc.aio.ServicerContext,
    method: str,
    request: Any,
    error: BaseException,
) -> None:
    """Abort the RPC with the status for ``error``; this always raises."""
    code, details, error_class = status_of(method, request, error)
    await context.abort(
        code, details, trailing_metadata=((ERROR_METADATA_KEY, error_class),)
    )


async def _reject_undecodable(
    context: grpc.aio.ServicerContext, method: str, request: UndecodableRequest
) -> None:
    logger.info("%s failed: request not decodable: %s", method, request.error)
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"invalid request to {method}: {request.error}",
        trailing_metadata=((ERROR_METADATA_KEY, "InvalidArgument"),),
    )


def _wrap_unary(
    method: str,
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, UndecodableRequest):
            await _reject_undecodable(context, method, request)
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:
            await _abort(context, method, request, error)

    return wrapped


def _wrap_stream(
    method: str,
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        if isinstance(request, UndecodableRequest):
            await _reject_undecodable(context, method, request)
        try:
            async for response in behavior(request, context):
                yield response
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:
            await _abort(context, method, request, error)

    return wrapped


def _wrap_client_stream(
    method: str,
    behavior: Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], Awaitable[Any]],
) -> Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], Awaitable[Any]]:
    """Map the exceptions of a client-streaming method, as _wrap_unary does.

    What _abort logs comes from the stream's first request, or from its
    ``header`` field where it has one.
    """

    async def wrapped(
        request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> Any:
        first: list[Any] = []

        async def checked() -> AsyncIterator[Any]:
            async for request in request_iterator:
                if isinstance(request, UndecodableRequest):
                    raise InvalidArgument(
                        f"invalid request to {method}: {request.error}"
                    )
                if not first:
                    has_header = "header" in request.DESCRIPTOR.fields_by_name
                    if has_header and request.HasField("header"):
                        first.append(request.header)
                    else:
                        first.append(request)
                yield request

        try:
            return await behavior(checked(), context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:
            await _abort(context, method, first[0] if first else None, error)

    return wrapped


class MethodInterceptor(grpc.aio.ServerInterceptor):
    """Base of the interceptors that wrap the handler of every engine.v1 method.

    Methods of other services (health, reflection) pass through unchanged.
    A handler is wrapped on its method's first call and the wrapper reused
    while gRPC returns the same handler object, as it does for a registered
    method, so an RPC builds no closures or handler tuples.
    """

    def __init__(self) -> None:
        # Method path -> (the handler gRPC returned, its wrapper).
        self._wrappers: dict[
            str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]
        ] = {}

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """Return the handler that runs in place of ``handler`` for method ``name``.

        ``name`` is the method without the package, such as "SandboxService.Create".
        """
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        cached = self._wrappers.get(method)
        if cached is None or cached[0] is not handler:
            name = method.removeprefix(SERVICE_PREFIX).replace("/", ".")
            cached = (handler, self.wrap(name, handler))
            self._wrappers[method] = cached
        return cached[1]


class ErrorInterceptor(MethodInterceptor):
    """Map the exceptions of every engine.v1 service method to gRPC statuses."""

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserializer = _wrap_deserializer(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(name, handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(name, handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_client_stream(name, handler.stream_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
