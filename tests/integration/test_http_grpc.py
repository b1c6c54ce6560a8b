"""DeploymentService over gRPC: the errors it returns for bad requests."""

from __future__ import annotations

import grpc
import pytest
from beam_support import Beam

from engine.core.deployments import DeploymentKind, DeploymentSpec, package_directory
from engine.errors import InvalidArgument, NotFound
from engine.sdk.deploy import DeploymentClient
from engine.v1 import deployment_pb2 as pb
from engine.v1 import deployment_pb2_grpc


def test_get_and_delete_unknown(beam: Beam) -> None:
    with DeploymentClient(beam.daemon.address) as client:
        with pytest.raises(NotFound, match="not found"):
            client.get("00000000-0000-4000-8000-000000000000")
        with pytest.raises(NotFound, match="not found"):
            client.delete("00000000-0000-4000-8000-000000000000")


def test_deploy_invalid_requests(beam: Beam) -> None:
    package = package_directory(beam.app_dir)
    with grpc.insecure_channel(beam.daemon.address) as channel:
        stub = deployment_pb2_grpc.DeploymentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unspecified:
            stub.Deploy(
                pb.DeployRequest(
                    spec=pb.DeploymentSpec(name="no-kind", handler="app:square"),
                    package=package,
                )
            )
        assert unspecified.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid deployment kind" in unspecified.value.details()
    with DeploymentClient(beam.daemon.address) as client:
        spec = DeploymentSpec(
            name="bad-package", kind=DeploymentKind.ENDPOINT, handler="app:square"
        )
        with pytest.raises(InvalidArgument, match="not a gzip-compressed tar"):
            client.deploy(spec, b"garbage")
        missing = DeploymentSpec(
            name="bad-module", kind=DeploymentKind.ENDPOINT, handler="nomodule:f"
        )
        with pytest.raises(InvalidArgument, match="is not in the package"):
            client.deploy(missing, package)
        assert client.list(name="bad-package") == []
        assert client.list(name="bad-module") == []


def test_list_by_workspace(beam: Beam) -> None:
    beam.deploy("listed", "square")
    other = beam.deploy("listed", "square", workspace="elsewhere")
    with DeploymentClient(beam.daemon.address) as client:
        default = client.list(name="listed")
        elsewhere = client.list(workspace="elsewhere", name="listed")
    assert [d.version for d in default] == [1]
    assert [d.deployment_id for d in elsewhere] == [other.deployment_id]
    assert elsewhere[0].version == 1
