"""The engine's exception tree.

Every layer below the API boundaries raises these (or ``OSError`` from the
runtime). ``engine.server.interceptor.ErrorInterceptor`` maps them to gRPC
status codes, and the SDK maps those codes back to the same classes:

    EngineError
    ├── NotFound             gRPC NOT_FOUND
    ├── AlreadyExists        gRPC ALREADY_EXISTS
    ├── InvalidArgument      gRPC INVALID_ARGUMENT
    ├── FailedPrecondition   gRPC FAILED_PRECONDITION (e.g. a terminated sandbox)
    ├── PermissionDenied     gRPC PERMISSION_DENIED
    ├── ResourceExhausted    gRPC RESOURCE_EXHAUSTED
    ├── Unauthenticated      gRPC UNAUTHENTICATED (missing or unknown token)
    ├── DeadlineExceeded     gRPC DEADLINE_EXCEEDED
    ├── Unavailable          gRPC UNAVAILABLE (daemon or kernel facility missing)
    └── InternalError        gRPC INTERNAL
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    code = "INTERNAL"


class NotFound(EngineError):
    code = "NOT_FOUND"


class AlreadyExists(EngineError):
    code = "ALREADY_EXISTS"


class InvalidArgument(EngineError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(EngineError):
    code = "FAILED_PRECONDITION"


class PermissionDenied(EngineError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(EngineError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(EngineError):
    code = "UNAUTHENTICATED"


class DeadlineExceeded(EngineError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(EngineError):
    code = "UNAVAILABLE"


class InternalError(EngineError):
    code = "INTERNAL"


BY_CODE: dict[str, type[EngineError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        InvalidArgument,
        FailedPrecondition,
        PermissionDenied,
        ResourceExhausted,
        Unauthenticated,
        DeadlineExceeded,
        Unavailable,
        InternalError,
    )
}
