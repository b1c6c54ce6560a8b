"""The SecretService servicer: create, list and delete secrets, never return values.

Methods raise ``engine.errors`` classes, and ``ErrorInterceptor`` maps them to
gRPC statuses. No log line of this module contains a value.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from engine.core.secrets import SecretInfo
from engine.server.convert import timestamp_from_proto, timestamp_to_proto
from engine.v1 import secret_pb2 as pb
from engine.v1 import secret_pb2_grpc

if TYPE_CHECKING:
    from engine.core.engine import Engine

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SecretService"].full_name


def secret_to_proto(info: SecretInfo) -> pb.Secret:
    return pb.Secret(
        name=info.name,
        created_at=timestamp_to_proto(info.created_at),
        updated_at=timestamp_to_proto(info.updated_at),
    )


def secret_from_proto(message: pb.Secret) -> SecretInfo:
    return SecretInfo(
        name=message.name,
        created_at=timestamp_from_proto(message.created_at),
        updated_at=timestamp_from_proto(message.updated_at),
    )


class SecretServicer(secret_pb2_grpc.SecretServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Create(
        self, request: pb.SecretCreateRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecretCreateResponse:
        info, created = await self._engine.create_secret(
            request.name, request.value, overwrite=request.overwrite
        )
        return pb.SecretCreateResponse(secret=secret_to_proto(info), created=created)

    async def List(
        self, request: pb.SecretListRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecretListResponse:
        infos = await self._engine.list_secrets()
        return pb.SecretListResponse(secrets=[secret_to_proto(i) for i in infos])

    async def Delete(
        self, request: pb.SecretDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecretDeleteResponse:
        await self._engine.delete_secret(request.name)
        return pb.SecretDeleteResponse()
