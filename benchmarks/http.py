"""`python -m benchmarks.http`: the HTTP routes beside a bare Starlette server.

    sudo .venv/bin/python -m benchmarks.http --update-docs

Starts a real daemon (`engine serve --http 127.0.0.1:0`) on a temporary data
dir and, in another process, a Starlette hello-world on uvicorn. One client
process (a minimal asyncio HTTP/1.1 client) measures both on 127.0.0.1:

- warm endpoint latency: sequential POSTs to a deployed function that
  returns a constant, after warm-up calls, p50 and p99;
- throughput: POSTs from ``--concurrency`` concurrent requests, for the
  deployed endpoint and for the bare server's route;
- task throughput: ``--tasks`` no-op tasks submitted concurrently, from the
  first submit to the last task's ended_at.

Prints a Markdown report; with ``--update-docs`` it replaces the text
between the http:begin and http:end markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from benchmarks.report import replace_section

ROOT = Path(__file__).resolve().parents[1]
ENGINE_BIN = ROOT / ".venv" / "bin" / "engine"
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- http:begin -->"
END = "<!-- http:end -->"
# Targets on the 2-core reference machine.
LATENCY_TARGET_MS = 5.0
THROUGHPUT_RATIO_TARGET = 0.3
TASKS_TARGET_PER_SECOND = 300.0
START_TIMEOUT = 60.0
SERVING_LINE = re.compile(r"engine daemon serving on .*(http://[0-9.]+:[0-9]+)")

APP_SOURCE = """
def hello():
    return {"hello": "world"}


def noop():
    return None
"""

BARE_SERVER = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def hello(request):
    await request.body()
    return JSONResponse({"hello": "world"})


app = Starlette(routes=[Route("/hello", hello, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False)
"""

DOCS_EXPLANATION = """
## HTTP routes

`python -m benchmarks.http` starts a daemon with `--http 127.0.0.1:0`, deploys
a function that returns a constant as an endpoint and a no-op function as a
task queue (2 containers each, kept warm), and starts a bare Starlette
hello-world on uvicorn in another process. One client process on the same
machine, a minimal asyncio HTTP/1.1 client with keep-alive connections,
drives both over 127.0.0.1, so the client's own cost is in every number.

- Latency: sequential POSTs to the warm endpoint (p50 and p99), after
  warm-up calls. Each goes HTTP -> Starlette -> the container's runner
  (a frame on its stdin) -> back.
- Throughput: POSTs with a fixed number of requests in flight, for the
  endpoint and for the bare server; the ratio is endpoint / bare.
- Tasks: no-op tasks submitted with the same concurrency, from the first
  submit to the last task's `ended_at`.

```sh
sudo .venv/bin/python -m benchmarks.http --update-docs
```
"""


@dataclass
class Results:
    latency_ms: list[float]
    endpoint_rps: float
    bare_rps: float
    bare_latency_ms: list[float]
    tasks_per_second: float
    tasks: int
    concurrency: int
    requests: int


class RawClient:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams.

    httpx spends more CPU per request than a bare uvicorn server does, so with
    it the client, not the server, would set the throughput. This client only
    writes a fixed request and reads the status line, the headers and a
    Content-Length body.
    """

    def __init__(self, url: str, token: str = "") -> None:
        host_port = url.removeprefix("http://")
        host, _, port = host_port.partition(":")
        self.host = host
        self.port = int(port)
        self.auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes = b"{}") -> tuple[int, bytes]:
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.auth}"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        data = await self.reader.readexactly(length)
        if status >= 400:
            raise RuntimeError(f"POST {path} returned {status}: {data[:200]!r}")
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_http(url: str, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            httpx.post(url, headers=headers, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not respond within {START_TIMEOUT} s")


@contextmanager
def daemon(work_dir: Path) -> Iterator[tuple[str, Path, str]]:
    """Run a daemon with --http; yield its URL, data dir and socket address."""
    data_dir = work_dir / "data"
    data_dir.mkdir(mode=0o755)
    log_path = work_dir / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(ENGINE_BIN),
                "serve",
                "--data-dir",
                str(data_dir),
                "--http",
                "127.0.0.1:0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        url = ""
        while not url:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "the daemon did not start; log:\n" + log_path.read_text()
                )
            match = SERVING_LINE.search(log_path.read_text(errors="replace"))
            url = match.group(1) if match else ""
            time.sleep(0.05)
        yield url, data_dir, f"unix:{data_dir / 'engine.sock'}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(60)


@contextmanager
def bare_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER, str(port)], stdin=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/hello")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def deploy(address: str, data_dir: Path, app_dir: Path) -> str:
    """Deploy the two functions and return a token."""
    from engine.core.deployments import (
        DeploymentKind,
        DeploymentSpec,
        package_directory,
    )
    from engine.sdk.deploy import DeploymentClient

    package = package_directory(app_dir)
    with DeploymentClient(address) as client:
        client.deploy(
            DeploymentSpec(
                name="hello",
                kind=DeploymentKind.ENDPOINT,
                handler="app:hello",
                keep_warm=600,
                workers=2,
            ),
            package,
        )
        client.deploy(
            DeploymentSpec(
                name="noop",
                kind=DeploymentKind.TASK_QUEUE,
                handler="app:noop",
                keep_warm=600,
                workers=2,
            ),
            package,
        )
    token = subprocess.run(
        [str(ENGINE_BIN), "token", "create", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return token


async def sequential(url: str, token: str, path: str, count: int) -> list[float]:
    client = RawClient(url, token)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            await client.post(path)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await client.close()
    return samples


async def concurrent(
    url: str, token: str, path: str, count: int, concurrency: int
) -> tuple[float, list[bytes]]:
    """POST ``count`` times with ``concurrency`` connections; return requests/s."""
    remaining = count
    bodies: list[bytes] = []
    clients = [RawClient(url, token) for _ in range(concurrency)]
    for client in clients:
        await client.connect()

    async def worker(client: RawClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            bodies.append((await client.post(path))[1])

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for client in clients))
        elapsed = time.perf_counter() - started
    finally:
        for client in clients:
            await client.close()
    return count / elapsed, bodies


async def task_throughput(url: str, token: str, count: int, concurrency: int) -> float:
    """Submit ``count`` no-op tasks; return tasks/s from first submit to last end."""
    started = time.time()
    _, bodies = await concurrent(url, token, "/taskqueue/noop", count, concurrency)
    ids = [json.loads(body)["task_id"] for body in bodies]
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 300
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        # Polling every task while they run would compete with the workers,
        # so only the last submitted one is polled until it ends.
        while True:
            body = (await client.get(f"/v2/task/{ids[-1]}/")).json()
            if body["status"] not in ("PENDING", "RUNNING"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the tasks did not complete in 300 s")
            await asyncio.sleep(0.05)
        ended: list[float] = []
        for task_id in ids:
            while True:
                body = (await client.get(f"/v2/task/{task_id}/")).json()
                if body["status"] == "COMPLETE":
                    break
                if body["status"] != "PENDING" and body["status"] != "RUNNING":
                    raise RuntimeError(f"task {task_id} ended {body['status']}")
                await asyncio.sleep(0.05)
            ended.append(datetime.fromisoformat(body["ended_at"]).timestamp())
    return count / (max(ended) - started)


async def measure(
    url: str, bare_url: str, token: str, options: argparse.Namespace
) -> Results:
    # Warm-up: starts both containers of the endpoint.
    await concurrent(url, token, "/endpoint/hello", 50, 2)
    await concurrent(bare_url, "", "/hello", 50, 2)
    latency = await sequential(url, token, "/endpoint/hello", options.latency_requests)
    bare_latency = await sequential(bare_url, "", "/hello", options.latency_requests)
    endpoint_rps, _ = await concurrent(
        url, token, "/endpoint/hello", options.requests, options.concurrency
    )
    bare_rps, _ = await concurrent(
        bare_url, "", "/hello", options.requests, options.concurrency
    )
    tasks_rate = await task_throughput(url, token, options.tasks, options.concurrency)
    return Results(
        latency_ms=latency,
        endpoint_rps=endpoint_rps,
        bare_rps=bare_rps,
        bare_latency_ms=bare_latency,
        tasks_per_second=tasks_rate,
        tasks=options.tasks,
        concurrency=options.concurrency,
        requests=options.requests,
    )


def render(results: Results) -> str:
    p50 = statistics.median(results.latency_ms)
    p99 = percentile(results.latency_ms, 0.99)
    ratio = results.endpoint_rps / results.bare_rps
    cpu = os.cpu_count()

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    lines = [
        f"Run at {datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} on"
        f" {cpu} cores; {len(results.latency_ms)} sequential calls,"
        f" {results.requests} requests at concurrency {results.concurrency},"
        f" {results.tasks} tasks.",
        "",
        "| measure | engine | bare Starlette | target | result |",
        "|---|---|---|---|---|",
        f"| warm endpoint p50 (ms) | {p50:.2f} |"
        f" {statistics.median(results.bare_latency_ms):.2f} |"
        f" <= {LATENCY_TARGET_MS:g} | {verdict(p50 <= LATENCY_TARGET_MS)} |",
        f"| warm endpoint p99 (ms) | {p99:.2f} |"
        f" {percentile(results.bare_latency_ms, 0.99):.2f} | | |",
        f"| throughput (requests/s) | {results.endpoint_rps:.0f} |"
        f" {results.bare_rps:.0f} | >= {THROUGHPUT_RATIO_TARGET:g}x bare"
        f" ({ratio:.2f}x) | {verdict(ratio >= THROUGHPUT_RATIO_TARGET)} |",
        f"| tasks, submit to COMPLETE (tasks/s) | {results.tasks_per_second:.0f} |"
        f" | >= {TASKS_TARGET_PER_SECOND:g} |"
        f" {verdict(results.tasks_per_second >= TASKS_TARGET_PER_SECOND)} |",
    ]
    return "\n".join(lines)


def update_docs(path: Path, report: str) -> None:
    """Replace the text between the markers; append markers and a section if absent."""
    missing = f"{DOCS_EXPLANATION}\n{BEGIN}\n{END}\n"
    replace_section(path, BEGIN, END, report + "\n", missing)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http",
        description="Measure the HTTP routes against a bare Starlette server.",
    )
    parser.add_argument(
        "--latency-requests",
        type=int,
        default=1000,
        help="sequential calls for p50 and p99 (default: 1000)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=3000,
        help="requests per throughput run (default: 3000)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="requests in flight in the throughput and task runs (default: 16)",
    )
    parser.add_argument(
        "--tasks", type=int, default=3000, help="tasks to submit (default: 3000)"
    )
    parser.add_argument(
        "--update-docs", action="store_true", help="write the report into the docs"
    )
    parser.add_argument(
        "--docs", type=Path, default=DEFAULT_DOCS, help="docs page to update"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    for name in ("latency_requests", "requests", "concurrency", "tasks"):
        if getattr(options, name) < 1:
            print(
                f"error: --{name.replace('_', '-')} must be 1 or more", file=sys.stderr
            )
            return 2
    work_dir = Path(tempfile.mkdtemp(prefix="eng-bench-http-", dir="/tmp"))
    work_dir.chmod(0o755)
    try:
        app_dir = work_dir / "app"
        app_dir.mkdir()
        (app_dir / "app.py").write_text(APP_SOURCE)
        with daemon(work_dir) as (url, data_dir, address), bare_server() as bare_url:
            token = deploy(address, data_dir, app_dir)
            results = asyncio.run(measure(url, bare_url, token, options))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report = render(results)
    print(report)
    if options.update_docs:
        update_docs(options.docs, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
