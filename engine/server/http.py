"""The Beam-compatible HTTP routes, served by Starlette on uvicorn in the daemon.

The app shares the daemon's Engine and event loop. Every route requires
``Authorization: Bearer TOKEN`` with a token from `engine token create`. A
token reaches only the deployments and tasks of its own workspace, and those
of other workspaces are reported as not found.

Errors are JSON objects {"error": {"type": ..., "message": ...}}: 400 for a
body that is not JSON, 422 for JSON that is not an object, 401 for a missing
or unknown token, 404 for an unknown deployment, version, id or task, 429 when
too many calls wait, 500 when the function raised (with its type, message and,
where the deployment allows it, its traceback), 503 when a container could
not be started, and 504 when a call timed out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from engine.core.deployments import DeploymentKind
from engine.core.functions import CallTimeout, FunctionError, QueueFull, for_engine
from engine.core.tasks import Task
from engine.errors import (
    EngineError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from engine.server.openapi import openapi_document

if TYPE_CHECKING:
    from engine.core.engine import Engine

log = logging.getLogger(__name__)

# Largest request body read, in bytes; larger bodies get 413.
MAX_BODY_BYTES = 16 * 1024 * 1024


class HttpError(Exception):
    def __init__(
        self, status: int, error_type: str, message: str, traceback: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


def json_response(body: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type="application/json",
    )


def error_response(error: HttpError) -> Response:
    body: dict[str, Any] = {"type": error.error_type, "message": error.message}
    if error.traceback:
        body["traceback"] = error.traceback
    response = json_response({"error": body}, error.status)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def http_error(error: EngineError) -> HttpError:
    """Map an engine error to the HTTP status that the routes document."""
    if isinstance(error, FunctionError):
        return HttpError(500, error.error_type, error.message, error.traceback)
    if isinstance(error, CallTimeout):
        return HttpError(504, "Timeout", str(error))
    if isinstance(error, QueueFull):
        return HttpError(429, "TooManyRequests", str(error))
    if isinstance(error, NotFound):
        return HttpError(404, "NotFound", str(error))
    if isinstance(error, InvalidArgument):
        return HttpError(422, "InvalidArgument", str(error))
    if isinstance(error, FailedPrecondition):
        return HttpError(404, "NotFound", str(error))
    if isinstance(error, Unavailable):
        return HttpError(503, "Unavailable", str(error))
    return HttpError(503, type(error).__name__, str(error))


def iso_time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def parse_uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise HttpError(404, "NotFound", f"{what} {value!r} not found") from None


class BeamApp:
    """The routes and the state they share: the Engine and its functions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.functions = for_engine(engine)
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/endpoint/id/{id}", self.invoke_by_id, methods=["POST"]),
            Route(
                "/endpoint/{name}/v{version:int}",
                self.invoke_version,
                methods=["POST"],
            ),
            Route("/endpoint/{name}", self.invoke_latest, methods=["POST"]),
            Route("/taskqueue/{name}", self.submit_task, methods=["POST"]),
            Route("/v2/task/cancel/", self.cancel_tasks, methods=["DELETE"]),
            Route(
                "/v2/task/{task_id}/outputs/{name:path}",
                self.download_output,
                methods=["GET"],
            ),
            Route("/v2/task/{task_id}/", self.get_task, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes)
        self.app.add_exception_handler(HttpError, self._handle)  # type: ignore[arg-type]
        self.app.add_exception_handler(Exception, self._handle_unexpected)
        self.app.add_exception_handler(
            StarletteHTTPException,
            self._handle_unrouted,  # type: ignore[arg-type]
        )
        self.app.add_exception_handler(EngineError, self._handle_engine)  # type: ignore[arg-type]

    async def _handle(self, request: Request, error: HttpError) -> Response:
        return error_response(error)

    async def _handle_unexpected(self, request: Request, error: Exception) -> Response:
        """Log a bug under an id and return a 500 response without its details."""
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "%s %s failed (error id %s)",
            request.method,
            request.url.path,
            error_id,
            exc_info=error,
        )
        message = f"internal error {error_id}; see the daemon's log"
        return error_response(HttpError(500, "InternalError", message))

    async def _handle_unrouted(
        self, request: Request, error: StarletteHTTPException
    ) -> Response:
        """Return the response for a path or method that no route serves.

        The token is checked first (401), and the error body is JSON.
        """
        try:
            self.authorize(request)
        except HttpError as unauthorized:
            return error_response(unauthorized)
        if error.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
            return error_response(HttpError(404, "NotFound", message))
        return error_response(
            HttpError(error.status_code, "HTTPError", str(error.detail))
        )

    async def _handle_engine(self, request: Request, error: EngineError) -> Response:
        mapped = http_error(error)
        if mapped.status >= 500 and not isinstance(error, FunctionError):
            log.warning("%s %s failed: %s", request.method, request.url.path, error)
        return error_response(mapped)

    # Helpers.

    def authorize(self, request: Request) -> str:
        """Return the workspace of the request's Bearer token, or raise 401."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HttpError(
                401,
                "Unauthorized",
                "missing Bearer token: send Authorization: Bearer TOKEN, with a"
                " token from `engine token create`",
            )
        tokens = self.engine.tokens
        workspace = tokens.workspace_of(token) if tokens is not None else None
        if workspace is None:
            raise HttpError(
                401,
                "Unauthorized",
                "invalid token: create one with `engine token create`",
            )
        return workspace

    @staticmethod
    async def kwargs(request: Request) -> dict[str, Any]:
        """Return the JSON object body; an empty body is {}."""
        too_large = HttpError(
            413,
            "PayloadTooLarge",
            f"request body is over the limit of {MAX_BODY_BYTES} bytes",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_large
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > MAX_BODY_BYTES:
                raise too_large
        body = bytes(received)
        if not body.strip():
            return {}
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise HttpError(
                400, "InvalidJSON", f"request body is not valid JSON: {error}"
            ) from None
        except RecursionError:
            raise HttpError(
                400,
                "InvalidJSON",
                "request body nests JSON arrays or objects too deeply to parse",
            ) from None
        if not isinstance(value, dict):
            raise HttpError(
                422,
                "InvalidArgument",
                f"request body must be a JSON object of keyword arguments, got"
                f" {type(value).__name__}",
            )
        return value

    async def _invoke(self, request: Request, deployment: Any) -> Response:
        kwargs = await self.kwargs(request)
        result = await self.functions.invoke(deployment, kwargs)
        return json_response(result)

    # Routes.

    async def health(self, request: Request) -> Response:
        self.authorize(request)
        return json_response({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        self.authorize(request)
        return json_response(openapi_document())

    async def invoke_latest(self, request: Request) -> Response:
        workspace = self.authorize(request)
        deployment = self.functions.store.find(
            workspace, request.path_params["name"], kind=DeploymentKind.ENDPOINT
        )
        return await self._invoke(request, deployment)

    async def invoke_version(self, request: Request) -> Response:
        workspace = self.authorize(request)
        name = request.path_params["name"]
        version = request.path_params["version"]
        # SQLite integers are 64-bit; a larger version cannot exist.
        if version >= 2**63:
            raise HttpError(
                404, "NotFound", f"deployment {name!r} version {version} not found"
            )
        deployment = self.functions.store.find(
            workspace, name, version, kind=DeploymentKind.ENDPOINT
        )
        return await self._invoke(request, deployment)

    async def invoke_by_id(self, request: Request) -> Response:
        workspace = self.authorize(request)
        deployment_id = parse_uuid(request.path_params["id"], "deployment")
        deployment = self.functions.store.get(deployment_id, workspace)
        if deployment.spec.kind != DeploymentKind.ENDPOINT:
            raise HttpError(
                404, "NotFound", f"endpoint deployment {deployment_id!r} not found"
            )
        return await self._invoke(request, deployment)

    async def submit_task(self, request: Request) -> Response:
        workspace = self.authorize(request)
        deployment = self.functions.store.find(
            workspace, request.path_params["name"], kind=DeploymentKind.TASK_QUEUE
        )
        kwargs = await self.kwargs(request)
        assert self.functions.tasks is not None
        task_id = self.functions.tasks.submit(deployment, kwargs)
        return json_response({"task_id": task_id})

    def _task_body(self, request: Request, task: Task) -> dict[str, Any]:
        now = time.time()
        expires_in = None
        if task.outputs_expire_at is not None:
            expires_in = max(0, int(task.outputs_expire_at - now))
        base = str(request.base_url).rstrip("/")
        outputs = [
            {
                "name": output["name"],
                "size": output["size"],
                "url": f"{base}/v2/task/{task.task_id}/outputs/"
                + urllib.parse.quote(output["name"]),
                "expires_in": expires_in,
            }
            for output in task.outputs
        ]
        return {
            "id": task.task_id,
            "status": task.status.value,
            "outputs": outputs,
            "started_at": iso_time(task.started_at),
            "ended_at": iso_time(task.ended_at),
            "expires_in": expires_in,
            "created_at": iso_time(task.created_at),
            "attempts": task.attempts,
            "deployment_id": task.deployment_id,
            "result": task.result,
            "error": task.error,
        }

    async def get_task(self, request: Request) -> Response:
        workspace = self.authorize(request)
        task_id = parse_uuid(request.path_params["task_id"], "task")
        assert self.functions.tasks is not None
        task = self.functions.tasks.get(task_id, workspace)
        return json_response(self._task_body(request, task))

    async def cancel_tasks(self, request: Request) -> Response:
        workspace = self.authorize(request)
        body = await self.kwargs(request)
        task_ids = body.get("task_ids")
        if not isinstance(task_ids, list) or not all(
            isinstance(item, str) for item in task_ids
        ):
            raise HttpError(
                422,
                "InvalidArgument",
                'request body must be {"task_ids": [TASK_ID, ...]} with string ids',
            )
        valid: list[str] = []
        invalid: list[str] = []
        for item in task_ids:
            try:
                valid.append(str(uuid.UUID(item)))
            except ValueError:
                invalid.append(item)
        assert self.functions.tasks is not None
        report = self.functions.tasks.cancel(valid, workspace)
        return json_response(
            {
                "cancelled": report.cancelled,
                "finished": report.finished,
                "not_found": invalid + report.not_found,
            }
        )

    async def download_output(self, request: Request) -> Response:
        workspace = self.authorize(request)
        task_id = parse_uuid(request.path_params["task_id"], "task")
        name = request.path_params["name"]
        assert self.functions.tasks is not None
        task = self.functions.tasks.get(task_id, workspace)
        now = time.time()
        listed = any(output["name"] == name for output in task.outputs)
        expired = task.outputs_expire_at is None or task.outputs_expire_at <= now
        if not listed or expired:
            raise HttpError(
                404,
                "NotFound",
                f"output {name!r} of task {task_id} not found or expired",
            )
        path = self.functions.tasks.output_path(task_id, name)
        if not path.is_file():
            raise HttpError(
                404, "NotFound", f"output {name!r} of task {task_id} not found"
            )
        return FileResponse(path, filename=Path(name).name)


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the daemon."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def bind(listen: str) -> socket.socket:
    """Bind a listening TCP socket for ``listen`` (HOST:PORT; port 0 picks one)."""
    host, separator, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not separator or not host or not port_text.isdigit():
        raise InvalidArgument(
            f"invalid --http address {listen!r}: expected HOST:PORT, such as"
            " 127.0.0.1:8080"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # asyncio (base_events._set_nodelay in CPython 3.11) sets TCP_NODELAY only
    # on sockets whose proto is IPPROTO_TCP. Without it, Nagle's algorithm and
    # delayed ACKs added about 40 ms to each response (measured here).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port_text)))
    except OSError as error:
        sock.close()
        raise Unavailable(
            f"failed to listen on {listen} for HTTP: {error.strerror}"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


@contextlib.asynccontextmanager
async def serve_http(engine: Engine, sock: socket.socket) -> AsyncIterator[str]:
    """Serve the HTTP routes on ``sock`` until the context exits; yield the address."""
    import asyncio

    app = BeamApp(engine)
    config = uvicorn.Config(
        app.app,
        log_level="warning",
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise Unavailable("the HTTP server stopped during its start")
        await asyncio.sleep(0.01)
    host, port = sock.getsockname()[:2]
    address = f"{host}:{port}"
    log.info("serving HTTP on http://%s", address)
    try:
        yield address
    finally:
        server.should_exit = True
        await task
        sock.close()
