"""The DeploymentService servicer and the conversions of its messages.

Methods raise ``engine.errors`` classes, and ``ErrorInterceptor`` maps them to
gRPC statuses as it does for every engine.v1 service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from engine.core.deployments import (
    Deployment,
    DeploymentKind,
    DeploymentSpec,
)
from engine.core.functions import for_engine
from engine.core.tenancy import current_workspace, is_local_admin, requested_workspace
from engine.errors import InvalidArgument
from engine.server.convert import timestamp_from_proto, timestamp_to_proto
from engine.v1 import deployment_pb2 as pb
from engine.v1 import deployment_pb2_grpc

if TYPE_CHECKING:
    from engine.core.engine import Engine

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DeploymentService"].full_name

KINDS: dict[DeploymentKind, int] = {
    DeploymentKind.ENDPOINT: pb.DEPLOYMENT_KIND_ENDPOINT,
    DeploymentKind.TASK_QUEUE: pb.DEPLOYMENT_KIND_TASK_QUEUE,
}
KINDS_FROM_PROTO: dict[int, DeploymentKind] = {v: k for k, v in KINDS.items()}


def spec_to_proto(spec: DeploymentSpec) -> pb.DeploymentSpec:
    message = pb.DeploymentSpec(
        name=spec.name,
        kind=KINDS[spec.kind],
        handler=spec.handler,
        image=spec.image,
        cpu=spec.cpu,
        memory_mib=spec.memory_mib,
        timeout_seconds=spec.timeout,
        retries=spec.retries,
        workers=spec.workers,
        callback_url=spec.callback_url,
        max_pending=spec.max_pending,
        traceback=spec.traceback,
        workspace=spec.workspace,
        outputs_expire_seconds=spec.outputs_expire,
    )
    if spec.keep_warm is not None:
        message.keep_warm_seconds = spec.keep_warm
    return message


def spec_from_proto(message: pb.DeploymentSpec) -> DeploymentSpec:
    kind = KINDS_FROM_PROTO.get(message.kind)
    if kind is None:
        raise InvalidArgument(
            f"invalid deployment kind {message.kind}: set DEPLOYMENT_KIND_ENDPOINT"
            " or DEPLOYMENT_KIND_TASK_QUEUE"
        )
    return DeploymentSpec(
        name=message.name,
        kind=kind,
        handler=message.handler,
        image=message.image,
        cpu=message.cpu,
        memory_mib=message.memory_mib,
        timeout=message.timeout_seconds,
        retries=message.retries,
        keep_warm=(
            message.keep_warm_seconds if message.HasField("keep_warm_seconds") else None
        ),
        workers=message.workers,
        callback_url=message.callback_url,
        max_pending=message.max_pending,
        traceback=message.traceback,
        workspace=requested_workspace(message.workspace),
        outputs_expire=message.outputs_expire_seconds,
    )


def deployment_to_proto(deployment: Deployment) -> pb.Deployment:
    return pb.Deployment(
        id=deployment.deployment_id,
        version=deployment.version,
        spec=spec_to_proto(deployment.spec),
        created_at=timestamp_to_proto(deployment.created_at),
        package_bytes=deployment.package_bytes,
    )


def deployment_from_proto(message: pb.Deployment) -> Deployment:
    return Deployment(
        deployment_id=message.id,
        version=message.version,
        spec=spec_from_proto(message.spec),
        created_at=timestamp_from_proto(message.created_at),
        package_bytes=message.package_bytes,
    )


def _id_scope() -> str | None:
    """Return the workspace that ids resolve in; None lets the local admin see all."""
    return None if is_local_admin() else current_workspace()


class DeploymentServicer(deployment_pb2_grpc.DeploymentServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Deploy(
        self, request: pb.DeployRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeployResponse:
        functions = for_engine(self._engine)
        deployment = await functions.deploy(
            spec_from_proto(request.spec), request.package
        )
        return pb.DeployResponse(deployment=deployment_to_proto(deployment))

    async def List(
        self, request: pb.DeploymentListRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeploymentListResponse:
        store = for_engine(self._engine).store
        deployments = store.list(requested_workspace(request.workspace), request.name)
        return pb.DeploymentListResponse(
            deployments=[deployment_to_proto(d) for d in deployments]
        )

    async def Get(
        self, request: pb.DeploymentGetRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeploymentGetResponse:
        deployment = for_engine(self._engine).store.get(request.id, _id_scope())
        return pb.DeploymentGetResponse(deployment=deployment_to_proto(deployment))

    async def Delete(
        self, request: pb.DeploymentDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeploymentDeleteResponse:
        await for_engine(self._engine).delete(request.id, _id_scope())
        return pb.DeploymentDeleteResponse()


def add_to_server(engine: Engine, server: grpc.aio.Server) -> None:
    """Register DeploymentService on ``server``; errors map through ErrorInterceptor."""
    deployment_pb2_grpc.add_DeploymentServiceServicer_to_server(
        DeploymentServicer(engine), server
    )
