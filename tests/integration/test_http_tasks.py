"""Task queues and the Tasks API against the real daemon over HTTP."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from beam_support import Beam, create_token

from engine.core.deployments import DeploymentKind

QUEUE = DeploymentKind.TASK_QUEUE
FINAL = {"COMPLETE", "ERROR", "CANCELLED", "TIMEOUT"}


def submit(client: httpx.Client, name: str, body: dict[str, Any]) -> str:
    response = client.post(f"/taskqueue/{name}", json=body)
    assert response.status_code == 200, response.text
    return response.json()["task_id"]


def test_task_completes_with_result(beam: Beam) -> None:
    beam.deploy("square-queue", "square", kind=QUEUE)
    with beam.client() as client:
        task_id = submit(client, "square-queue", {"x": 5})
        assert str(uuid.UUID(task_id)) == task_id
        task = beam.wait_task(client, task_id, FINAL)
    assert task["id"] == task_id
    assert task["status"] == "COMPLETE"
    assert task["result"] == {"y": 25}
    assert task["attempts"] == 1
    assert task["started_at"] is not None
    assert task["ended_at"] >= task["started_at"]
    assert task["outputs"] == []


def test_task_states_pending_running(beam: Beam) -> None:
    beam.deploy("slow-queue", "sleep", kind=QUEUE, workers=1)
    with beam.client() as client:
        first = submit(client, "slow-queue", {"seconds": 2})
        second = submit(client, "slow-queue", {"seconds": 0})
        running = beam.wait_task(client, first, {"RUNNING"})
        assert running["ended_at"] is None
        pending = client.get(f"/v2/task/{second}/").json()
        assert pending["status"] == "PENDING"
        assert pending["started_at"] is None
        assert beam.wait_task(client, second, FINAL)["status"] == "COMPLETE"


def test_task_retries_count_attempts(beam: Beam) -> None:
    marker = f"/tmp/flaky-{uuid.uuid4().hex}"
    beam.deploy("flaky-queue", "flaky", kind=QUEUE, retries=2, keep_warm=30)
    beam.deploy("failing-queue", "fail", kind=QUEUE, retries=1)
    with beam.client() as client:
        flaky = submit(client, "flaky-queue", {"marker": marker, "failures": 2})
        failing = submit(client, "failing-queue", {"message": "always"})
        recovered = beam.wait_task(client, flaky, FINAL)
        failed = beam.wait_task(client, failing, FINAL)
    assert recovered["status"] == "COMPLETE"
    assert recovered["attempts"] == 3
    assert recovered["result"] == {"attempt": 3}
    assert failed["status"] == "ERROR"
    assert failed["attempts"] == 2
    assert failed["error"]["type"] == "ValueError"
    assert failed["error"]["message"] == "always"


def test_task_timeout(beam: Beam) -> None:
    beam.deploy("timeout-queue", "sleep", kind=QUEUE, timeout=1, retries=3)
    with beam.client() as client:
        task_id = submit(client, "timeout-queue", {"seconds": 30})
        task = beam.wait_task(client, task_id, FINAL, timeout=30)
    assert task["status"] == "TIMEOUT"
    assert task["attempts"] == 1
    assert task["error"]["type"] == "TimeoutError"


def test_task_body_errors(beam: Beam) -> None:
    beam.deploy("body-queue", "square", kind=QUEUE)
    with beam.client() as client:
        assert client.post("/taskqueue/body-queue", content=b"{").status_code == 400
        assert client.post("/taskqueue/body-queue", content=b"[]").status_code == 422
        unknown = client.get(f"/v2/task/{uuid.uuid4()}/")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["type"] == "NotFound"
        assert client.get("/v2/task/not-a-uuid/").status_code == 404


def test_cancel_pending_running_unknown(beam: Beam) -> None:
    beam.deploy("cancel-queue", "sleep", kind=QUEUE, workers=1)
    with beam.client() as client:
        running = submit(client, "cancel-queue", {"seconds": 60})
        pending = submit(client, "cancel-queue", {"seconds": 0})
        beam.wait_task(client, running, {"RUNNING"})
        unknown = str(uuid.uuid4())
        response = client.request(
            "DELETE",
            "/v2/task/cancel/",
            json={"task_ids": [running, pending, unknown, "junk"]},
        )
        assert response.status_code == 200
        report = response.json()
        assert sorted(report["cancelled"]) == sorted([running, pending])
        assert report["not_found"] == ["junk", unknown]
        assert report["finished"] == {}
        for task_id in (running, pending):
            task = client.get(f"/v2/task/{task_id}/").json()
            assert task["status"] == "CANCELLED"
            assert task["ended_at"] is not None
        # Idempotent: cancelling again reports the same ids as cancelled.
        again = client.request(
            "DELETE", "/v2/task/cancel/", json={"task_ids": [running, pending]}
        ).json()
        assert sorted(again["cancelled"]) == sorted([running, pending])
        # The killed container is replaced: the next task still runs.
        after = submit(client, "cancel-queue", {"seconds": 0, "value": "after"})
        task = beam.wait_task(client, after, FINAL)
        assert task["status"] == "COMPLETE"
        assert task["result"]["value"] == "after"


def test_cancel_finished_task_reported(beam: Beam) -> None:
    beam.deploy("done-queue", "square", kind=QUEUE)
    with beam.client() as client:
        task_id = submit(client, "done-queue", {"x": 1})
        beam.wait_task(client, task_id, FINAL)
        report = client.request(
            "DELETE", "/v2/task/cancel/", json={"task_ids": [task_id]}
        ).json()
        assert report["finished"] == {task_id: "COMPLETE"}
        assert report["cancelled"] == []
        assert client.get(f"/v2/task/{task_id}/").json()["status"] == "COMPLETE"


def test_cancel_body_errors(beam: Beam) -> None:
    with beam.client() as client:
        cases = [b"{", b"[]", b"{}", b'{"task_ids": "x"}', b'{"task_ids": [1]}']
        expected = [400, 422, 422, 422, 422]
        statuses = [
            client.request("DELETE", "/v2/task/cancel/", content=body).status_code
            for body in cases
        ]
    assert statuses == expected


def test_cancel_completion_race(beam: Beam) -> None:
    """Cancels sent while tasks finish: every task ends in exactly one state
    and the report agrees with the state the task keeps."""
    beam.deploy("race-queue", "sleep", kind=QUEUE, workers=2, keep_warm=30)
    with beam.client() as client:
        task_ids = [
            submit(client, "race-queue", {"seconds": 0.01 * (i % 5)}) for i in range(40)
        ]
        reports = []
        for task_id in task_ids:
            reports.append(
                client.request(
                    "DELETE", "/v2/task/cancel/", json={"task_ids": [task_id]}
                ).json()
            )
            time.sleep(0.005)
        finals = [beam.wait_task(client, t, FINAL) for t in task_ids]
        time.sleep(0.5)
        settled = [client.get(f"/v2/task/{t}/").json() for t in task_ids]
    for task_id, report, final, later in zip(
        task_ids, reports, finals, settled, strict=True
    ):
        assert later["status"] == final["status"], task_id
        if task_id in report["cancelled"]:
            assert final["status"] == "CANCELLED", task_id
            assert final["result"] is None, task_id
        else:
            assert report["finished"][task_id] == final["status"], task_id
            assert final["status"] == "COMPLETE", task_id


def test_thousand_tasks_none_lost(beam: Beam) -> None:
    beam.deploy("bulk-queue", "square", kind=QUEUE, workers=2, keep_warm=30)

    async def run() -> tuple[list[str], list[dict[str, Any]]]:
        limits = httpx.Limits(max_connections=20)
        async with beam.async_client(limits=limits) as client:
            semaphore = asyncio.Semaphore(20)

            async def submit_one(x: int) -> str:
                async with semaphore:
                    response = await client.post("/taskqueue/bulk-queue", json={"x": x})
                    assert response.status_code == 200, response.text
                    return response.json()["task_id"]

            ids = await asyncio.gather(*(submit_one(x) for x in range(1000)))
            deadline = time.monotonic() + 120
            tasks: list[dict[str, Any]] = []
            while time.monotonic() < deadline:

                async def fetch(task_id: str) -> dict[str, Any]:
                    async with semaphore:
                        response = await client.get(f"/v2/task/{task_id}/")
                        return response.json()

                tasks = await asyncio.gather(*(fetch(t) for t in ids))
                if all(task["status"] in FINAL for task in tasks):
                    break
                await asyncio.sleep(0.5)
            return list(ids), tasks

    ids, tasks = asyncio.run(run())
    assert len(set(ids)) == 1000
    assert [task["status"] for task in tasks] == ["COMPLETE"] * 1000
    assert [task["result"]["y"] for task in tasks] == [x * x for x in range(1000)]


def test_outputs_download_and_expiry(beam: Beam) -> None:
    beam.deploy("output-queue", "write_output", kind=QUEUE, outputs_expire=3)
    other = create_token(beam.daemon.data_dir, workspace="elsewhere")
    with beam.client() as client:
        task_id = submit(
            client, "output-queue", {"name": "sub/result.txt", "text": "payload"}
        )
        task = beam.wait_task(client, task_id, FINAL)
        assert task["status"] == "COMPLETE"
        assert task["expires_in"] <= 3
        assert len(task["outputs"]) == 1
        output = task["outputs"][0]
        assert output["name"] == "sub/result.txt"
        assert output["size"] == len("payload")
        download = client.get(output["url"])
        assert download.status_code == 200
        assert download.content == b"payload"
        assert (
            client.get(output["url"], headers={"Authorization": ""}).status_code == 401
        )
        with beam.client(token=other) as foreign:
            assert foreign.get(output["url"]).status_code == 404
        missing = client.get(f"/v2/task/{task_id}/outputs/other.txt")
        assert missing.status_code == 404
        time.sleep(3.5)
        assert client.get(output["url"]).status_code == 404
        stored = beam.daemon.data_dir / "outputs" / task_id
        deadline = time.monotonic() + 15
        while stored.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not stored.exists()
        assert client.get(f"/v2/task/{task_id}/").json()["outputs"] == []


def test_output_helper_saves_file(beam: Beam) -> None:
    beam.deploy("helper-queue", "save_output", kind=QUEUE)
    beam.deploy("helper-endpoint", "save_output")
    with beam.client() as client:
        task_id = submit(client, "helper-queue", {"text": "from helper"})
        task = beam.wait_task(client, task_id, FINAL)
        assert task["status"] == "COMPLETE"
        assert [output["name"] for output in task["outputs"]] == ["report.txt"]
        download = client.get(task["outputs"][0]["url"])
        assert download.content == b"from helper"
        endpoint = client.post("/endpoint/helper-endpoint")
    assert endpoint.status_code == 500
    assert "task queue calls" in endpoint.json()["error"]["message"]


class CallbackServer:
    """A local HTTP server that records callback bodies; it can fail first."""

    def __init__(self, failures: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.failures = failures
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                status = 503 if owner.failures > 0 else 200
                owner.failures -= 1
                owner.statuses.append(status)
                if status == 200:
                    owner.bodies.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def callback_server() -> Iterator[Callable[..., CallbackServer]]:
    servers: list[CallbackServer] = []

    def start(failures: int = 0) -> CallbackServer:
        server = CallbackServer(failures)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the callback"
        time.sleep(0.05)


def test_callback_delivered_after_5xx(
    beam: Beam, callback_server: Callable[..., CallbackServer]
) -> None:
    server = callback_server(failures=2)
    beam.deploy("hook-queue", "square", kind=QUEUE, callback_url=server.url)
    beam.deploy("hook-fail", "fail", kind=QUEUE, callback_url=server.url)
    with beam.client() as client:
        done = submit(client, "hook-queue", {"x": 6})
        wait_for(lambda: len(server.bodies) == 1)
        failed = submit(client, "hook-fail", {"message": "hooked"})
        wait_for(lambda: len(server.bodies) == 2)
    assert server.statuses[:3] == [503, 503, 200]
    assert server.bodies[0] == {
        "task_id": done,
        "status": "COMPLETE",
        "result": {"y": 36},
    }
    assert server.bodies[1]["task_id"] == failed
    assert server.bodies[1]["status"] == "ERROR"
    assert server.bodies[1]["error"]["message"] == "hooked"


def test_callback_never_blocks_worker(beam: Beam) -> None:
    # Nothing listens on this port, so every attempt fails to connect, and
    # the callback retries in the background while the worker goes on.
    probe = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = probe.server_address[1]
    probe.server_close()
    beam.deploy(
        "hook-down",
        "square",
        kind=QUEUE,
        workers=1,
        callback_url=f"http://127.0.0.1:{port}/hook",
    )
    with beam.client() as client:
        started = time.monotonic()
        ids = [submit(client, "hook-down", {"x": x}) for x in range(5)]
        tasks = [beam.wait_task(client, t, FINAL) for t in ids]
        elapsed = time.monotonic() - started
    assert [task["status"] for task in tasks] == ["COMPLETE"] * 5
    assert elapsed < 10


def test_tasks_survive_sigkill(private_daemon: Callable[..., Beam]) -> None:
    first = private_daemon()
    first.deploy("durable", "sleep", kind=QUEUE, workers=1, retries=1)
    first.deploy("fragile", "sleep", kind=QUEUE, workers=1, retries=0)
    with first.client() as client:
        retried = submit(client, "durable", {"seconds": 10, "value": "retried"})
        first.wait_task(client, retried, {"RUNNING"})
        queued = [
            submit(client, "durable", {"seconds": 0, "value": i}) for i in range(20)
        ]
        lost = submit(client, "fragile", {"seconds": 30})
        first.wait_task(client, lost, {"RUNNING"})
    first.daemon.kill()

    second = private_daemon(first.daemon.data_dir, token=first.token)
    with second.client() as client:
        fragile = second.wait_task(client, lost, FINAL)
        assert fragile["status"] == "ERROR"
        assert fragile["error"]["type"] == "DaemonRestart"
        results = [second.wait_task(client, t, FINAL) for t in queued]
        assert [task["status"] for task in results] == ["COMPLETE"] * 20
        assert [task["result"]["value"] for task in results] == list(range(20))
        task = second.wait_task(client, retried, FINAL)
    assert task["status"] == "COMPLETE"
    assert task["attempts"] == 2
    assert task["result"]["value"] == "retried"


def test_clean_stop_keeps_attempt(private_daemon: Callable[..., Beam]) -> None:
    first = private_daemon()
    first.deploy("graceful", "sleep", kind=QUEUE, workers=1, retries=0)
    with first.client() as client:
        task_id = submit(client, "graceful", {"seconds": 5, "value": "again"})
        first.wait_task(client, task_id, {"RUNNING"})
    assert first.daemon.stop() == 0

    second = private_daemon(first.daemon.data_dir, token=first.token)
    with second.client() as client:
        task = second.wait_task(client, task_id, FINAL)
    assert task["status"] == "COMPLETE"
    assert task["attempts"] == 1
    assert task["result"]["value"] == "again"


def test_callback_on_cancel(
    beam: Beam, callback_server: Callable[..., CallbackServer]
) -> None:
    server = callback_server()
    beam.deploy("hook-cancel", "sleep", kind=QUEUE, callback_url=server.url)
    with beam.client() as client:
        task_id = submit(client, "hook-cancel", {"seconds": 60})
        beam.wait_task(client, task_id, {"RUNNING"})
        client.request("DELETE", "/v2/task/cancel/", json={"task_ids": [task_id]})
        wait_for(lambda: len(server.bodies) == 1)
    assert server.bodies[0]["task_id"] == task_id
    assert server.bodies[0]["status"] == "CANCELLED"


def test_outputs_in_other_workspace(beam: Beam) -> None:
    beam.deploy("team-output", "write_output", kind=QUEUE, workspace="team")
    team = create_token(beam.daemon.data_dir, workspace="team")
    with beam.client(token=team) as client:
        task_id = submit(client, "team-output", {"name": "r.txt", "text": "team"})
        task = beam.wait_task(client, task_id, FINAL)
        assert task["status"] == "COMPLETE", task
        download = client.get(task["outputs"][0]["url"])
        assert download.content == b"team"
