"""Deploy Python functions: Beam-style decorators and the DeploymentService client.

```python
from engine.sdk.deploy import endpoint

@endpoint(name="square", cpu=0.5, memory=256)
def square(x: int) -> dict:
    return {"y": x * x}

deployment = square.deploy()   # packages this file's directory
```

The deployed function runs in a sandbox and is called over HTTP at POST
/endpoint/square with a JSON object body, whose keys become its keyword
arguments. Calling ``square(x=3)`` locally runs the plain function.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from engine import errors
from engine.core.deployments import (
    Deployment,
    DeploymentKind,
    DeploymentSpec,
    package_directory,
)
from engine.sdk.client import error_from_rpc, open_channel, resolve_address
from engine.v1 import deployment_pb2 as pb
from engine.v1 import deployment_pb2_grpc

# Deploy requests carry the whole package; the daemon accepts up to 16 MiB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def parse_memory(value: int | str | None) -> int:
    """Return MiB from 512, "512", "512Mi" or "1Gi"; None or 0 means the default."""
    if value is None or value == 0:
        return 0
    if isinstance(value, int):
        return value
    text = value.strip()
    units = {"Mi": 1, "M": 1, "Gi": 1024, "G": 1024}
    for suffix, factor in units.items():
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            return int(text[: -len(suffix)]) * factor
    if text.isdigit():
        return int(text)
    raise errors.InvalidArgument(
        f"invalid memory {value!r}: expected MiB, or a size such as 512Mi or 1Gi"
    )


class DeploymentClient:
    """A connection to the daemon's DeploymentService."""

    def __init__(self, address: str | None = None, token: str | None = None) -> None:
        from engine.server.deployments import deployment_from_proto

        self._from_proto = deployment_from_proto
        self.address = resolve_address(address)
        self._channel = open_channel(
            self.address,
            token,
            options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
        )
        self.stub = deployment_pb2_grpc.DeploymentServiceStub(self._channel)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None

    def deploy(self, spec: DeploymentSpec, package: bytes) -> Deployment:
        from engine.server.deployments import spec_to_proto

        request = pb.DeployRequest(spec=spec_to_proto(spec), package=package)
        return self._from_proto(self._call("Deploy", request).deployment)

    def list(self, workspace: str = "", name: str = "") -> list[Deployment]:
        request = pb.DeploymentListRequest(workspace=workspace, name=name)
        return [self._from_proto(d) for d in self._call("List", request).deployments]

    def get(self, deployment_id: str) -> Deployment:
        request = pb.DeploymentGetRequest(id=deployment_id)
        return self._from_proto(self._call("Get", request).deployment)

    def delete(self, deployment_id: str) -> None:
        self._call("Delete", pb.DeploymentDeleteRequest(id=deployment_id))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DeploymentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DeployableFunction:
    """A function with deployment settings; ``deploy()`` sends it to the daemon."""

    def __init__(
        self, function: Callable[..., Any], kind: DeploymentKind, settings: dict
    ) -> None:
        functools.update_wrapper(self, function)
        self.function = function
        self.kind = kind
        self.settings = settings

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def spec(self) -> DeploymentSpec:
        source = Path(inspect.getfile(self.function))
        settings = dict(self.settings)
        name = settings.pop("name", None) or self.function.__name__.replace("_", "-")
        settings["memory_mib"] = parse_memory(settings.pop("memory", None))
        return DeploymentSpec(
            name=name,
            kind=self.kind,
            handler=f"{source.stem}:{self.function.__name__}",
            **settings,
        )

    def deploy(self, address: str | None = None) -> Deployment:
        """Package the directory of the function's file and deploy it."""
        source = Path(inspect.getfile(self.function)).resolve()
        package = package_directory(source.parent)
        with DeploymentClient(address) as client:
            return client.deploy(self.spec(), package)


def _decorator(kind: DeploymentKind, settings: dict) -> Any:
    def wrap(function: Callable[..., Any]) -> DeployableFunction:
        return DeployableFunction(function, kind, settings)

    return wrap


def endpoint(
    *,
    name: str | None = None,
    cpu: float = 1.0,
    memory: int | str = 512,
    image: str = "host",
    timeout: float = 0.0,
    keep_warm_seconds: float | None = None,
    workers: int = 1,
    max_pending: int = 0,
    traceback: bool = False,
    workspace: str = "",
) -> Callable[[Callable[..., Any]], DeployableFunction]:
    """Mark a function as a synchronous HTTP endpoint, as Beam's ``@endpoint``.

    ``memory`` is in MiB or a size such as "1Gi"; times are in seconds.
    """
    return _decorator(
        DeploymentKind.ENDPOINT,
        {
            "name": name,
            "cpu": cpu,
            "memory": memory,
            "image": image,
            "timeout": timeout,
            "keep_warm": keep_warm_seconds,
            "workers": workers,
            "max_pending": max_pending,
            "traceback": traceback,
            "workspace": workspace,
        },
    )


def task_queue(
    *,
    name: str | None = None,
    cpu: float = 1.0,
    memory: int | str = 512,
    image: str = "host",
    timeout: float = 0.0,
    retries: int = 0,
    keep_warm_seconds: float | None = None,
    workers: int = 1,
    callback_url: str = "",
    max_pending: int = 0,
    traceback: bool = False,
    workspace: str = "",
) -> Callable[[Callable[..., Any]], DeployableFunction]:
    """Mark a function as an asynchronous task queue, as Beam's ``@task_queue``."""
    return _decorator(
        DeploymentKind.TASK_QUEUE,
        {
            "name": name,
            "cpu": cpu,
            "memory": memory,
            "image": image,
            "timeout": timeout,
            "retries": retries,
            "keep_warm": keep_warm_seconds,
            "workers": workers,
            "callback_url": callback_url,
            "max_pending": max_pending,
            "traceback": traceback,
            "workspace": workspace,
        },
    )
