"""The wrapper cache of the gRPC interceptors, with a stand-in for gRPC's lookup."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc

from engine.server.auth import AuthInterceptor
from engine.server.interceptor import ErrorInterceptor, MethodInterceptor

GET = "/engine.v1.SandboxService/Get"


async def _behavior(request: Any, context: Any) -> Any:
    return request


def _intercept(
    interceptor: MethodInterceptor, method: str, handler: grpc.RpcMethodHandler
) -> grpc.RpcMethodHandler:
    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return handler

    details = SimpleNamespace(method=method, invocation_metadata=())
    return asyncio.run(interceptor.intercept_service(continuation, details))


def test_interceptors_reuse_wrapper_per_handler() -> None:
    for interceptor in (ErrorInterceptor(), AuthInterceptor(lambda token: None)):
        handler = grpc.unary_unary_rpc_method_handler(_behavior)
        first = _intercept(interceptor, GET, handler)
        second = _intercept(interceptor, GET, handler)
        assert first is not handler
        assert first.unary_unary is not None
        assert second is first


def test_interceptor_wraps_new_handler_again() -> None:
    interceptor = ErrorInterceptor()
    first = _intercept(interceptor, GET, grpc.unary_unary_rpc_method_handler(_behavior))
    replacement = grpc.unary_unary_rpc_method_handler(_behavior)
    second = _intercept(interceptor, GET, replacement)
    assert second is not first
    assert second is not replacement


def test_interceptor_passes_other_services_through() -> None:
    interceptor = ErrorInterceptor()
    handler = grpc.unary_unary_rpc_method_handler(_behavior)
    method = "/grpc.health.v1.Health/Check"
    assert _intercept(interceptor, method, handler) is handler
