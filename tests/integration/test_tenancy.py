"""Workspaces: a token of one workspace reaches nothing of another.

A daemon listens on TCP, and workspaces alpha and beta each get a token.
Alpha creates a sandbox with a running process and a file. Then every method
of every service whose request names a sandbox is called with beta's token
and alpha's ids, and each must return NOT_FOUND, as for an id that does not
exist. The same requests with alpha's token must get past the lookup, which
proves that the table reaches the real methods.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from beam_support import create_token
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

import engine.v1
from engine.core.deployments import DeploymentKind, DeploymentSpec, package_directory
from engine.core.models import CloudBucketConfig
from engine.errors import NotFound, PermissionDenied
from engine.sdk.deploy import DeploymentClient
from engine.sdk.secrets import SecretClient
from engine.sdk.volumes import VolumeClient
from engine.v1 import sandbox_pb2 as pb
from engine.v1 import sandbox_pb2_grpc
from tests.integration.conftest import (
    Daemon,
    free_port,
    make_data_dir,
    remove_data_dir,
    start_daemon,
)

# Values for the fields that requests need besides the sandbox id.
FIELD_VALUES: dict[str, object] = {
    "argv": ["true"],
    "path": "/tmp/alpha.txt",
    "source": "/tmp/alpha.txt",
    "destination": "/tmp/alpha-moved.txt",
    "pattern": "alpha",
    "replacement": "beta",
    "data": b"beta",
    "signal": 15,
    "mode": 0o644,
    "ttl_seconds": 600.0,
    "stream": 1,
}


def _methods() -> list[MethodDescriptor]:
    methods = []
    for info in pkgutil.iter_modules(engine.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"engine.v1.{info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                methods.extend(service.methods)
    return methods


def _names_sandbox(descriptor: Descriptor) -> bool:
    if "sandbox_id" in descriptor.fields_by_name:
        return True
    header = descriptor.fields_by_name.get("header")
    return header is not None and "sandbox_id" in header.message_type.fields_by_name


SANDBOX_METHODS = [m for m in _methods() if _names_sandbox(m.input_type)]


def _fill(message: Message, sandbox_id: str, pid: int) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.name == "sandbox_id":
            message.sandbox_id = sandbox_id
        elif field.name == "pid":
            message.pid = pid
        elif field.name == "header":
            _fill(message.header, sandbox_id, pid)
        elif field.name in FIELD_VALUES and field.type != FieldDescriptor.TYPE_MESSAGE:
            value = FIELD_VALUES[field.name]
            if field.is_repeated:
                getattr(message, field.name).extend(value)  # type: ignore[arg-type]
            else:
                setattr(message, field.name, value)


def build_requests(
    method: MethodDescriptor, sandbox_id: str, pid: int
) -> list[Message]:
    """Return the request, or for a client stream its header, data and end."""
    message_class = message_factory.GetMessageClass(method.input_type)
    if not method.client_streaming:
        message = message_class()
        _fill(message, sandbox_id, pid)
        return [message]
    header = message_class()
    _fill(header.header, sandbox_id, pid)
    data = FIELD_VALUES["data"]
    assert isinstance(data, bytes)
    end = message_class()
    end.end.size = len(data)
    return [header, message_class(data=data), end]


def call(
    channel: grpc.Channel, method: MethodDescriptor, requests: list[Message], token: str
) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with ``token``; return the status code and its details."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = (("authorization", f"Bearer {token}"),)
    serialize = type(requests[0]).SerializeToString
    try:
        if method.client_streaming:
            stub = channel.stream_unary(path, request_serializer=serialize)
            stub(iter(requests), metadata=metadata, timeout=20)
        elif method.server_streaming:
            stub = channel.unary_stream(path, request_serializer=serialize)
            for _ in stub(requests[0], metadata=metadata, timeout=20):
                pass
        else:
            stub = channel.unary_unary(path, request_serializer=serialize)
            stub(requests[0], metadata=metadata, timeout=20)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@dataclass
class Tenants:
    daemon: Daemon
    channel: grpc.Channel
    alpha: str
    beta: str
    sandbox_id: str
    pid: int
    tcp_address: str


@pytest.fixture(scope="module")
def tenants() -> Iterator[Tenants]:
    port = free_port()
    daemon = start_daemon(make_data_dir(), "--listen", f"127.0.0.1:{port}")
    try:
        alpha = create_token(daemon.data_dir, "alpha")
        beta = create_token(daemon.data_dir, "beta")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            auth = (("authorization", f"Bearer {alpha}"),)
            created = stub.Create(pb.CreateRequest(), metadata=auth, timeout=30)
            sandbox_id = created.sandbox.sandbox_id
            events = stub.Exec(
                pb.ExecRequest(
                    sandbox_id=sandbox_id,
                    argv=["sh", "-c", "echo alpha > /tmp/alpha.txt; exec sleep 600"],
                    stdin=True,
                ),
                metadata=auth,
                timeout=30,
            )
            pid = next(iter(events)).started.pid
            events.cancel()
            yield Tenants(
                daemon, channel, alpha, beta, sandbox_id, pid, f"127.0.0.1:{port}"
            )
    finally:
        status = daemon.stop()
        log = daemon.log()
        remove_data_dir(daemon)
        assert status == 0, log


def test_table_covers_every_sandbox_service() -> None:
    services = {method.containing_service.name for method in SANDBOX_METHODS}
    assert {"SandboxService", "FileService"} <= services
    assert len(SANDBOX_METHODS) >= 20


def method_id(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


@pytest.mark.parametrize("method", SANDBOX_METHODS, ids=method_id)
def test_other_workspace_gets_not_found(
    tenants: Tenants, method: MethodDescriptor
) -> None:
    requests = build_requests(method, tenants.sandbox_id, tenants.pid)
    status, details = call(tenants.channel, method, requests, tenants.beta)
    assert status == grpc.StatusCode.NOT_FOUND
    assert f"sandbox {tenants.sandbox_id} not found" in details


OWN_METHODS = [m for m in SANDBOX_METHODS if m.name != "Terminate"]


@pytest.mark.parametrize("method", OWN_METHODS, ids=method_id)
def test_own_workspace_gets_past_lookup(
    tenants: Tenants, method: MethodDescriptor
) -> None:
    requests = build_requests(method, tenants.sandbox_id, tenants.pid)
    _, details = call(tenants.channel, method, requests, tenants.alpha)
    assert f"sandbox {tenants.sandbox_id} not found" not in details


def list_ids(tenants: Tenants, token: str) -> set[str]:
    stub = sandbox_pb2_grpc.SandboxServiceStub(tenants.channel)
    reply = stub.List(
        pb.ListRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=20
    )
    return {sandbox.sandbox_id for sandbox in reply.sandboxes}


def test_list_shows_own_workspace_only(tenants: Tenants) -> None:
    assert tenants.sandbox_id in list_ids(tenants, tenants.alpha)
    assert tenants.sandbox_id not in list_ids(tenants, tenants.beta)


def test_unix_socket_sees_default_workspace(tenants: Tenants) -> None:
    with grpc.insecure_channel(tenants.daemon.address) as channel:
        reply = sandbox_pb2_grpc.SandboxServiceStub(channel).List(
            pb.ListRequest(), timeout=20
        )
    assert tenants.sandbox_id not in {s.sandbox_id for s in reply.sandboxes}


def test_sandbox_alive_after_attempts(tenants: Tenants) -> None:
    stub = sandbox_pb2_grpc.SandboxServiceStub(tenants.channel)
    reply = stub.Get(
        pb.GetRequest(sandbox_id=tenants.sandbox_id),
        metadata=(("authorization", f"Bearer {tenants.alpha}"),),
        timeout=20,
    )
    assert reply.sandbox.state == pb.SANDBOX_STATE_RUNNING


@pytest.fixture(scope="module")
def alpha_deployment(tenants: Tenants, tmp_path_factory: pytest.TempPathFactory) -> str:
    app = tmp_path_factory.mktemp("app")
    (app / "app.py").write_text("def answer():\n    return 42\n")
    spec = DeploymentSpec(
        name="answer", kind=DeploymentKind.ENDPOINT, handler="app:answer"
    )
    with DeploymentClient(tenants.tcp_address, token=tenants.alpha) as client:
        return client.deploy(spec, package_directory(app)).deployment_id


def test_other_workspace_cannot_get_deployment(
    tenants: Tenants, alpha_deployment: str
) -> None:
    with DeploymentClient(tenants.tcp_address, token=tenants.beta) as client:
        with pytest.raises(NotFound):
            client.get(alpha_deployment)
        with pytest.raises(NotFound):
            client.delete(alpha_deployment)
        assert client.list(name="answer") == []
    with DeploymentClient(tenants.tcp_address, token=tenants.alpha) as client:
        assert client.get(alpha_deployment).deployment_id == alpha_deployment


def test_token_cannot_name_other_workspace(
    tenants: Tenants, alpha_deployment: str
) -> None:
    client = DeploymentClient(tenants.tcp_address, token=tenants.beta)
    with client, pytest.raises(PermissionDenied, match="acts for workspace 'beta'"):
        client.list(workspace="alpha")


def test_secrets_scoped_to_workspace(tenants: Tenants) -> None:
    with SecretClient(tenants.tcp_address, token=tenants.alpha) as alpha:
        alpha.create("ALPHA_ONLY", "alpha-value")
        assert "ALPHA_ONLY" in [info.name for info in alpha.list()]
    with SecretClient(tenants.tcp_address, token=tenants.beta) as beta:
        assert "ALPHA_ONLY" not in [info.name for info in beta.list()]
        with pytest.raises(NotFound):
            beta.delete("ALPHA_ONLY")
        beta.create("ALPHA_ONLY", "beta-value")
    stub = sandbox_pb2_grpc.SandboxServiceStub(tenants.channel)
    auth = (("authorization", f"Bearer {tenants.beta}"),)
    created = stub.Create(
        pb.CreateRequest(spec=pb.SandboxSpec(secrets=["ALPHA_ONLY"])),
        metadata=auth,
        timeout=30,
    )
    try:
        events = stub.Exec(
            pb.ExecRequest(
                sandbox_id=created.sandbox.sandbox_id,
                argv=["sh", "-c", 'printf %s "$ALPHA_ONLY"'],
            ),
            metadata=auth,
            timeout=30,
        )
        output = b"".join(event.output.data for event in events)
    finally:
        stub.Terminate(
            pb.TerminateRequest(sandbox_id=created.sandbox.sandbox_id),
            metadata=auth,
            timeout=30,
        )
    assert output == b"beta-value"


def test_volumes_scoped_to_workspace(tenants: Tenants) -> None:
    with VolumeClient(tenants.tcp_address, token=tenants.alpha) as alpha:
        alpha.create("shared-name")
        alpha.write_bytes("shared-name", "owner.txt", b"alpha")
    with VolumeClient(tenants.tcp_address, token=tenants.beta) as beta:
        assert "shared-name" not in [info.name for info in beta.list()]
        with pytest.raises(NotFound):
            beta.read_bytes("shared-name", "owner.txt")
        with pytest.raises(NotFound):
            beta.delete("shared-name")
        beta.create("shared-name")
        with pytest.raises(NotFound):
            beta.read_bytes("shared-name", "owner.txt")
    with VolumeClient(tenants.tcp_address, token=tenants.alpha) as alpha:
        assert alpha.read_bytes("shared-name", "owner.txt") == b"alpha"


def test_sandbox_mounts_own_workspace_volume(tenants: Tenants) -> None:
    stub = sandbox_pb2_grpc.SandboxServiceStub(tenants.channel)
    auth = (("authorization", f"Bearer {tenants.beta}"),)
    spec = pb.SandboxSpec(volumes=[pb.VolumeMount(name="shared-name", mount_path="/v")])
    created = stub.Create(pb.CreateRequest(spec=spec), metadata=auth, timeout=30)
    try:
        events = stub.Exec(
            pb.ExecRequest(
                sandbox_id=created.sandbox.sandbox_id,
                argv=["sh", "-c", "ls /v; cat /v/owner.txt 2>/dev/null; echo end"],
            ),
            metadata=auth,
            timeout=30,
        )
        output = b"".join(event.output.data for event in events)
    finally:
        stub.Terminate(
            pb.TerminateRequest(sandbox_id=created.sandbox.sandbox_id),
            metadata=auth,
            timeout=30,
        )
    assert output == b"end\n"


def test_token_cannot_aim_bucket_at_host(tenants: Tenants) -> None:
    stub = sandbox_pb2_grpc.SandboxServiceStub(tenants.channel)
    auth = (("authorization", f"Bearer {tenants.alpha}"),)
    bucket = pb.CloudBucketMount(
        name="files",
        mount_path="/b",
        config=pb.CloudBucketConfig(endpoint="http://127.0.0.1:9", read_only=True),
    )
    before = list_ids(tenants, tenants.alpha)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Create(
            pb.CreateRequest(spec=pb.SandboxSpec(cloud_buckets=[bucket])),
            metadata=auth,
            timeout=30,
        )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "127.0.0.1" in (raised.value.details() or "")
    assert list_ids(tenants, tenants.alpha) == before


def test_token_cannot_post_callbacks_to_host(
    tenants: Tenants, tmp_path_factory: pytest.TempPathFactory
) -> None:
    app = tmp_path_factory.mktemp("callback-app")
    (app / "app.py").write_text("def noop():\n    return None\n")
    spec = DeploymentSpec(
        name="callback",
        kind=DeploymentKind.TASK_QUEUE,
        handler="app:noop",
        callback_url="http://127.0.0.1:9/hook",
    )
    client = DeploymentClient(tenants.tcp_address, token=tenants.alpha)
    with client, pytest.raises(PermissionDenied, match="callback_url"):
        client.deploy(spec, package_directory(app))


def test_token_cannot_aim_volume_at_host(tenants: Tenants) -> None:
    config = CloudBucketConfig(endpoint="http://127.0.0.1:9")
    client = VolumeClient(tenants.tcp_address, token=tenants.alpha)
    with client, pytest.raises(PermissionDenied, match="volume endpoint"):
        client.create("aimed", url="s3://bucket", s3=config)
    with VolumeClient(tenants.tcp_address, token=tenants.alpha) as client:
        assert "aimed" not in [info.name for info in client.list()]
