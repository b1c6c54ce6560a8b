"""Python SDK of the engine daemon.

``engine.sdk.sandbox`` has the synchronous API (``Sandbox``), ``engine.sdk.aio``
the asyncio one, and ``engine.sdk.embedded.EmbeddedEngine`` runs an engine
inside the calling process. Names load on first use, so importing this package
does not import gRPC.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Sandbox": "engine.sdk.sandbox",
    "SandboxInstance": "engine.sdk.sandbox",
    "SandboxProcess": "engine.sdk.sandbox",
    "SandboxProcessResponse": "engine.sdk.sandbox",
    "SandboxProcessStream": "engine.sdk.sandbox",
    "ProcessStatus": "engine.sdk.sandbox",
    "parse_memory": "engine.sdk.sandbox",
    "Volume": "engine.sdk.volumes",
    "VolumeClient": "engine.sdk.volumes",
    "SecretClient": "engine.sdk.secrets",
    "CloudBucket": "engine.sdk.sandbox",
    "CloudBucketConfig": "engine.sdk.sandbox",
    "EmbeddedEngine": "engine.sdk.embedded",
    "AsyncSandbox": "engine.sdk.aio",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
