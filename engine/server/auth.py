"""Bearer tokens on the gRPC API, and the workspace each call acts for.

``AuthInterceptor`` runs before every engine.v1 method. A call that sends
``authorization: Bearer <token>`` metadata acts for the token's workspace, and
an unknown token is UNAUTHENTICATED on any listener. A call without a token is
UNAUTHENTICATED on TCP. Over the unix socket, whose mode 0600 admits only
root, it acts for the default workspace. Health checks and reflection need no
token.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from engine.core.tenancy import DEFAULT_WORKSPACE, enter_workspace
from engine.errors import Unauthenticated
from engine.server.interceptor import ERROR_METADATA_KEY, MethodInterceptor

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "

# Returns the workspace of a token, or None for an unknown one.
TokenLookup = Callable[[str], str | None]


def _bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION_KEY:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if not text.startswith(BEARER_PREFIX):
                raise Unauthenticated(
                    "invalid authorization metadata: expected 'Bearer <token>'"
                )
            return text.removeprefix(BEARER_PREFIX).strip()
    return None


def _is_unix_peer(context: grpc.aio.ServicerContext) -> bool:
    return (context.peer() or "").startswith("unix:")


def resolve_workspace(
    token: str | None, *, unix_peer: bool, lookup: TokenLookup
) -> tuple[str, bool]:
    """Return the workspace a call acts for, and whether it is the local admin's.

    Raises Unauthenticated for an unknown token, and for a missing token on
    any listener but the unix socket.
    """
    if token is None:
        if unix_peer:
            return DEFAULT_WORKSPACE, True
        raise Unauthenticated(
            "missing bearer token: set ENGINE_TOKEN for the SDK and the CLI,"
            " or send 'authorization: Bearer <token>' metadata, with a token"
            " from `engine token create`"
        )
    workspace = lookup(token)
    if workspace is None:
        raise Unauthenticated(
            "invalid bearer token; create one with `engine token create`"
        )
    return workspace, False


class AuthInterceptor(MethodInterceptor):
    """Resolve each engine.v1 call's workspace from its token, or reject the call."""

    def __init__(self, lookup: TokenLookup) -> None:
        super().__init__()
        self._lookup = lookup

    def workspace_of(self, context: grpc.aio.ServicerContext) -> tuple[str, bool]:
        """Return the call's workspace and whether it is the local admin's.

        Raises Unauthenticated for a missing or unknown token.
        """
        return resolve_workspace(
            _bearer_token(context),
            unix_peer=_is_unix_peer(context),
            lookup=self._lookup,
        )

    async def _authorize(self, method: str, context: grpc.aio.ServicerContext) -> None:
        try:
            workspace, local_admin = self.workspace_of(context)
        except Unauthenticated as error:
            logger.info("%s from %s rejected: %s", method, context.peer(), error)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                str(error),
                trailing_metadata=((ERROR_METADATA_KEY, "Unauthenticated"),),
            )
        enter_workspace(workspace, local_admin=local_admin)

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        authorize = self._authorize
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            unary_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await authorize(name, context)
                return await unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **options)
        if handler.unary_stream is not None:
            unary_stream = handler.unary_stream

            async def server_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                await authorize(name, context)
                async for response in unary_stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(server_stream, **options)
        if handler.stream_unary is not None:
            stream_unary = handler.stream_unary

            async def client_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> Any:
                await authorize(name, context)
                return await stream_unary(requests, context)

            return grpc.stream_unary_rpc_method_handler(client_stream, **options)
        if handler.stream_stream is not None:
            stream_stream = handler.stream_stream

            async def bidi_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                await authorize(name, context)
                async for response in stream_stream(requests, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(bidi_stream, **options)
        return handler
