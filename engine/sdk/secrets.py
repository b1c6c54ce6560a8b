"""Secrets in the SDK: ``SecretClient`` stores them, sandboxes name them.

    from engine import Sandbox
    from engine.sdk.secrets import SecretClient

    with SecretClient() as secrets:
        secrets.create("API_TOKEN", "s3cr3t")

    with Sandbox(secrets=["API_TOKEN"]).create() as sb:
        sb.process.exec("sh", "-c", 'test -n "$API_TOKEN"').wait()   # 0

The daemon never returns a value: ``list`` gives names and times only.
Every method raises the classes of ``engine.errors``: InvalidArgument for a
bad name or value, AlreadyExists for a taken name without ``overwrite``,
NotFound for deleting an unknown secret.
"""

from __future__ import annotations

from typing import Any

import grpc

from engine.core.secrets import SecretInfo
from engine.sdk.client import error_from_rpc, open_channel, resolve_address
from engine.server.secrets import secret_from_proto
from engine.v1 import secret_pb2 as pb
from engine.v1 import secret_pb2_grpc

__all__ = ["SecretClient", "SecretInfo"]


class SecretClient:
    """A channel to one daemon's SecretService. It is thread-safe.

    ``address`` is "unix:/path" or "host:port"; without it, ENGINE_ADDRESS or
    the default socket is used.
    """

    def __init__(self, address: str | None = None, token: str | None = None) -> None:
        self.address = resolve_address(address)
        self._channel = open_channel(self.address, token)
        self.stub = secret_pb2_grpc.SecretServiceStub(self._channel)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SecretClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create(self, name: str, value: str, *, overwrite: bool = False) -> SecretInfo:
        """Store secret ``name``; with ``overwrite``, replace an existing value."""
        reply = self._call(
            "Create",
            pb.SecretCreateRequest(name=name, value=value, overwrite=overwrite),
        )
        return secret_from_proto(reply.secret)

    def list(self) -> list[SecretInfo]:
        """Return every secret's name and times, in name order."""
        reply = self._call("List", pb.SecretListRequest())
        return [secret_from_proto(secret) for secret in reply.secrets]

    def delete(self, name: str) -> None:
        self._call("Delete", pb.SecretDeleteRequest(name=name))
