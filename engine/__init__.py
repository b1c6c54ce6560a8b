"""Sandbox execution engine: Linux namespaces, cgroups and seccomp behind a gRPC daemon.

    from engine import Sandbox

    with Sandbox(cpu=1.0, memory="512Mi").create() as sb:
        print(sb.process.run_code("print(6*7)").stdout)

``Sandbox`` talks to a daemon (``engine serve``). ``Engine`` is the asyncio
core for embedding in a Python service, and ``EmbeddedEngine`` runs it with a
private gRPC socket for the synchronous SDK. Names load on first use, so
``import engine`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from engine import errors

_EXPORTS = {
    "Sandbox": "engine.sdk.sandbox",
    "SandboxInstance": "engine.sdk.sandbox",
    "SandboxProcess": "engine.sdk.sandbox",
    "SandboxProcessResponse": "engine.sdk.sandbox",
    "ProcessStatus": "engine.sdk.sandbox",
    "Volume": "engine.sdk.volumes",
    "VolumeClient": "engine.sdk.volumes",
    "SecretClient": "engine.sdk.secrets",
    "CloudBucket": "engine.sdk.sandbox",
    "CloudBucketConfig": "engine.sdk.sandbox",
    "EmbeddedEngine": "engine.sdk.embedded",
    "AsyncSandbox": "engine.sdk.aio",
    "FileInfo": "engine.core.files",
    "Match": "engine.core.files",
    "Engine": "engine.core.engine",
    "Config": "engine.config",
    "SandboxSpec": "engine.core.models",
    "SandboxInfo": "engine.core.models",
    "SandboxState": "engine.core.models",
    "ProcessInfo": "engine.core.models",
    "ProcessState": "engine.core.models",
    "ExitReason": "engine.core.models",
    "TerminationReason": "engine.core.models",
    "SandboxStats": "engine.core.models",
    "Stream": "engine.core.models",
    "EngineError": "engine.errors",
    "NotFound": "engine.errors",
    "InvalidArgument": "engine.errors",
    "FailedPrecondition": "engine.errors",
    "Unavailable": "engine.errors",
}

__all__ = ["errors", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
