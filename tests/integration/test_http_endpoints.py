"""Endpoint routes against the real daemon over HTTP: success and every error."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import time
import uuid
from pathlib import Path

from beam_support import Beam, create_token

from engine import Sandbox
from engine.core.deployments import DeploymentKind
from engine.core.models import SandboxState
from engine.sdk.deploy import DeploymentClient


def test_every_route_requires_token(beam: Beam) -> None:
    deployment = beam.deploy("auth-check", "square")
    task_id = str(uuid.uuid4())
    requests = [
        ("GET", "/health"),
        ("GET", "/openapi.json"),
        ("POST", "/endpoint/auth-check"),
        ("POST", "/endpoint/auth-check/v1"),
        ("POST", f"/endpoint/id/{deployment.deployment_id}"),
        ("POST", "/taskqueue/auth-check"),
        ("GET", f"/v2/task/{task_id}/"),
        ("DELETE", "/v2/task/cancel/"),
        ("GET", f"/v2/task/{task_id}/outputs/result.txt"),
        ("GET", "/no/such/route"),
        ("POST", "/endpoint/auth-check/v-1"),
    ]
    with beam.client() as authorized:
        for method, path in requests:
            missing = authorized.request(method, path, headers={"Authorization": ""})
            assert missing.status_code == 401, (method, path)
            assert missing.headers["www-authenticate"] == "Bearer"
            invalid = authorized.request(
                method, path, headers={"Authorization": "Bearer not-a-token"}
            )
            assert invalid.status_code == 401, (method, path)
            basic = authorized.request(
                method, path, headers={"Authorization": f"Basic {beam.token}"}
            )
            assert basic.status_code == 401, (method, path)


def test_health_and_openapi(beam: Beam) -> None:
    with beam.client() as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        document = client.get("/openapi.json")
        assert document.status_code == 200
        paths = set(document.json()["paths"])
    assert paths == {
        "/health",
        "/openapi.json",
        "/endpoint/{name}",
        "/endpoint/{name}/v{version}",
        "/endpoint/id/{id}",
        "/taskqueue/{name}",
        "/v2/task/{task_id}/",
        "/v2/task/{task_id}/outputs/{name}",
        "/v2/task/cancel/",
    }


def test_endpoint_by_name_version_and_id(beam: Beam) -> None:
    first = beam.deploy("square", "square")
    second = beam.deploy("square", "echo")
    assert first.version == 1
    assert second.version == 2
    assert first.deployment_id != second.deployment_id
    with beam.client() as client:
        latest = client.post("/endpoint/square", json={"x": 3})
        assert latest.status_code == 200
        assert latest.json()["kwargs"] == {"x": 3}
        pinned = client.post("/endpoint/square/v1", json={"x": 3})
        assert pinned.status_code == 200
        assert pinned.json() == {"y": 9}
        by_id = client.post(f"/endpoint/id/{first.deployment_id}", json={"x": 4})
        assert by_id.status_code == 200
        assert by_id.json() == {"y": 16}
        empty = client.post("/endpoint/square/v1")
        assert empty.status_code == 200
        assert empty.json() == {"y": 0}


def test_return_values_serialize_as_json(beam: Beam) -> None:
    beam.deploy("scalar", "scalar")
    beam.deploy("noop", "noop")
    with beam.client() as client:
        scalar = client.post("/endpoint/scalar")
        assert scalar.status_code == 200
        assert scalar.json() == 42
        none = client.post("/endpoint/noop")
        assert none.status_code == 200
        assert none.json() is None


def test_warm_calls_reuse_the_import(beam: Beam) -> None:
    beam.deploy("echo", "echo", keep_warm=30)
    with beam.client() as client:
        bodies = [client.post("/endpoint/echo").json() for _ in range(5)]
    assert [body["calls"] for body in bodies] == [1, 2, 3, 4, 5]
    assert len({body["imported_at"] for body in bodies}) == 1


def test_keep_warm_zero_stops_container(beam: Beam) -> None:
    beam.deploy("cold", "echo", keep_warm=0)
    with beam.client() as client:
        bodies = [client.post("/endpoint/cold").json() for _ in range(2)]
    assert [body["calls"] for body in bodies] == [1, 1]
    assert bodies[0]["imported_at"] != bodies[1]["imported_at"]


def test_unknown_name_version_id_404(beam: Beam) -> None:
    beam.deploy("known", "square")
    queue = beam.deploy("known-queue", "square", kind=DeploymentKind.TASK_QUEUE)
    with beam.client() as client:
        paths = [
            "/endpoint/missing",
            "/endpoint/known/v2",
            "/endpoint/known/v0",
            f"/endpoint/id/{uuid.uuid4()}",
            "/endpoint/id/not-a-uuid",
            "/endpoint/known/v-1",
            "/endpoint/known/v99999999999999999999999",
            "/endpoint/known/vx",
            "/endpoint/known/v1/extra",
            "/endpoint/known-queue",
            f"/endpoint/id/{queue.deployment_id}",
            "/taskqueue/known",
            "/taskqueue/missing",
        ]
        for path in paths:
            response = client.post(path, json={})
            assert response.status_code == 404, path
            assert response.json()["error"]["type"] == "NotFound", path


def test_body_not_object_rejected(beam: Beam) -> None:
    beam.deploy("body-check", "square")
    with beam.client() as client:
        invalid = client.post("/endpoint/body-check", content=b"{not json")
        assert invalid.status_code == 400
        assert invalid.json()["error"]["type"] == "InvalidJSON"
        huge = client.post(
            "/endpoint/body-check", content=b" " * (16 * 1024 * 1024 + 1)
        )
        assert huge.status_code == 413
        assert huge.json()["error"]["type"] == "PayloadTooLarge"
        for body in (b"[1, 2]", b"3", b'"text"', b"null"):
            response = client.post("/endpoint/body-check", content=body)
            assert response.status_code == 422, body
            assert response.json()["error"]["type"] == "InvalidArgument", body
        deep = client.post(
            "/endpoint/body-check", content=b"[" * 100_000 + b"]" * 100_000
        )
        assert deep.status_code == 400
        assert deep.json()["error"]["type"] == "InvalidJSON"


def test_exception_returns_500(beam: Beam) -> None:
    beam.deploy("fails", "fail")
    beam.deploy("fails-traced", "fail", traceback=True)
    with beam.client() as client:
        plain = client.post("/endpoint/fails", json={"message": "no good"})
        assert plain.status_code == 500
        error = plain.json()["error"]
        assert error["type"] == "ValueError"
        assert error["message"] == "no good"
        assert "traceback" not in error
        traced = client.post("/endpoint/fails-traced", json={"message": "no good"})
        assert traced.status_code == 500
        assert "raise ValueError(message)" in traced.json()["error"]["traceback"]
        # The container survives an exception and serves the next call.
        again = client.post("/endpoint/fails", json={"message": "again"})
        assert again.json()["error"]["message"] == "again"


def test_wrong_arguments_and_unserializable(beam: Beam) -> None:
    beam.deploy("args", "square")
    beam.deploy("unserializable", "unserializable")
    with beam.client() as client:
        wrong = client.post("/endpoint/args", json={"nope": 1})
        assert wrong.status_code == 500
        assert wrong.json()["error"]["type"] == "TypeError"
        unserializable = client.post("/endpoint/unserializable")
        assert unserializable.status_code == 500
        assert unserializable.json()["error"]["type"] == "TypeError"


def test_missing_function_fails_start(beam: Beam) -> None:
    beam.deploy("missing-function", "no_such_function")
    with beam.client() as client:
        response = client.post("/endpoint/missing-function")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "AttributeError"


def test_timeout_returns_504(beam: Beam) -> None:
    beam.deploy("slow", "sleep", timeout=1)
    with beam.client() as client:
        started = time.monotonic()
        response = client.post("/endpoint/slow", json={"seconds": 30})
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "Timeout"
        assert elapsed < 20
        # A new container serves the next call.
        after = client.post("/endpoint/slow", json={"seconds": 0, "value": 1})
        assert after.status_code == 200
        assert after.json()["value"] == 1


def test_queue_bound_returns_429(beam: Beam) -> None:
    beam.deploy("bounded", "sleep", workers=1, max_pending=1)

    def call() -> int:
        with beam.client() as client:
            return client.post("/endpoint/bounded", json={"seconds": 2}).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(call)
        time.sleep(1.0)  # The first call uses the only container.
        rest = [pool.submit(call) for _ in range(3)]
        statuses = [first.result()] + [future.result() for future in rest]
    assert statuses[0] == 200
    assert sorted(statuses[1:]) == [200, 429, 429]


def test_hundred_parallel_calls(beam: Beam) -> None:
    beam.deploy("parallel", "echo", workers=4, keep_warm=30)

    def call(index: int) -> tuple[int, dict]:
        with beam.client() as client:
            response = client.post("/endpoint/parallel", json={"index": index})
            return response.status_code, response.json()

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(call, range(100)))
    assert [status for status, _ in results] == [200] * 100
    indexes = sorted(body["kwargs"]["index"] for _, body in results)
    assert indexes == list(range(100))


def test_workspaces_are_isolated(beam: Beam) -> None:
    deployment = beam.deploy("private", "square")
    other = create_token(beam.daemon.data_dir, workspace="other")
    with beam.client(token=other) as client:
        assert client.post("/endpoint/private").status_code == 404
        by_id = client.post(f"/endpoint/id/{deployment.deployment_id}")
        assert by_id.status_code == 404
    with beam.client() as client:
        submitted = client.post("/endpoint/private", json={"x": 2})
        assert submitted.status_code == 200


def test_deleted_deployment_404(beam: Beam) -> None:
    deployment = beam.deploy("deleted", "square")
    with beam.client() as client:
        assert client.post("/endpoint/deleted").status_code == 200
        with DeploymentClient(beam.daemon.address) as deployments:
            deployments.delete(deployment.deployment_id)
        assert client.post("/endpoint/deleted").status_code == 404
        by_id = client.post(f"/endpoint/id/{deployment.deployment_id}")
        assert by_id.status_code == 404


def test_forged_frame_stops_container(beam: Beam) -> None:
    beam.deploy("forger", "forge_frame", timeout=60)
    with beam.client() as client:
        started = time.monotonic()
        response = client.post("/endpoint/forger")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "Unavailable"
    assert elapsed < 20


def running_containers(beam: Beam, deployment_id: str) -> int:
    infos = Sandbox.list(
        address=beam.daemon.address,
        state=SandboxState.RUNNING,
        labels={"engine.deployment": deployment_id},
    )
    return len(infos)


def test_containers_follow_keep_warm_and_workers(beam: Beam) -> None:
    deployment = beam.deploy("warm-limits", "sleep", keep_warm=2, workers=2)

    def call() -> int:
        with beam.client() as client:
            return client.post("/endpoint/warm-limits", json={"seconds": 1}).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: call(), range(6)))
    assert statuses == [200] * 6
    # Six concurrent calls ran on at most two containers, both still warm.
    assert running_containers(beam, deployment.deployment_id) == 2
    deadline = time.monotonic() + 15
    while running_containers(beam, deployment.deployment_id) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert running_containers(beam, deployment.deployment_id) == 0


def test_delete_stops_containers(beam: Beam) -> None:
    deployment = beam.deploy("delete-stops", "square", keep_warm=600)
    with beam.client() as client:
        assert client.post("/endpoint/delete-stops").status_code == 200
    assert running_containers(beam, deployment.deployment_id) == 1
    with DeploymentClient(beam.daemon.address) as deployments:
        deployments.delete(deployment.deployment_id)
    assert running_containers(beam, deployment.deployment_id) == 0


SDK_APP = """
from engine.sdk.deploy import endpoint, task_queue


@endpoint(name="sdk-square", cpu=0.5, memory="256Mi", keep_warm_seconds=5)
def square(x=0):
    return {"y": x * x}


@task_queue(name="sdk-queue", retries=1)
def double(x=0):
    return {"y": 2 * x}
"""


def test_sdk_decorators_deploy(beam: Beam, tmp_path: Path) -> None:
    (tmp_path / "sdkapp.py").write_text(SDK_APP)
    module_spec = importlib.util.spec_from_file_location(
        "sdkapp", tmp_path / "sdkapp.py"
    )
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    # Called locally, the decorated function is the plain function.
    assert module.square(x=3) == {"y": 9}

    endpoint_deployment = module.square.deploy(address=beam.daemon.address)
    beam.deployed.append(endpoint_deployment.deployment_id)
    queue_deployment = module.double.deploy(address=beam.daemon.address)
    beam.deployed.append(queue_deployment.deployment_id)
    assert endpoint_deployment.spec.handler == "sdkapp:square"
    assert endpoint_deployment.spec.cpu == 0.5
    assert endpoint_deployment.spec.memory_mib == 256
    assert endpoint_deployment.spec.keep_warm == 5
    assert queue_deployment.spec.kind == DeploymentKind.TASK_QUEUE
    assert queue_deployment.spec.retries == 1

    with beam.client() as client:
        response = client.post("/endpoint/sdk-square", json={"x": 4})
        assert response.status_code == 200
        assert response.json() == {"y": 16}
        task_id = client.post("/taskqueue/sdk-queue", json={"x": 4}).json()["task_id"]
        task = beam.wait_task(client, task_id, {"COMPLETE", "ERROR"})
    assert task["status"] == "COMPLETE"
    assert task["result"] == {"y": 8}
