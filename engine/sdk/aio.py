"""The asyncio SDK, with the same names and semantics as the synchronous one.

    from engine.sdk.aio import AsyncSandbox

    async with await AsyncSandbox(memory="256Mi").create() as sb:
        p = await sb.process.exec("python3", "-c", "print(6*7)")
        await p.wait()            # 0
        await p.stdout.read()     # "42\\n"

Each object uses one grpc.aio channel, which belongs to the event loop that
created it, so use an instance only on that loop.
"""

from __future__ import annotations

import contextlib
import signal as signal_module
from collections.abc import AsyncIterator
from typing import Any

import grpc

from engine import errors
from engine.core.models import (
    ProcessInfo,
    SandboxInfo,
    SandboxState,
    SandboxStats,
    Stream,
)
from engine.sdk.aio_direct import AsyncDirectChannel
from engine.sdk.client import (
    error_from_rpc,
    is_local_admin,
    open_aio_channel,
    open_direct,
    resolve_address,
)
from engine.sdk.direct import DirectUnreachable
from engine.sdk.files import AsyncSandboxFileSystem
from engine.sdk.sandbox import (
    STDIN_CHUNK_BYTES,
    OutputCursor,
    ProcessStatus,
    Sandbox,
    SandboxProcessResponse,
    _argv,
    _secret_names,
    network_request,
    run_request,
)
from engine.server import convert
from engine.v1 import sandbox_pb2 as pb
from engine.v1 import sandbox_pb2_grpc


class AsyncClient:
    """A grpc.aio channel to one daemon, with errors mapped to ``engine.errors``.

    As with ``Client``, ``call`` and ``stream`` use the daemon's direct socket
    on unix socket addresses unless ``direct`` is False.
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        direct: bool = True,
    ) -> None:
        self.address = resolve_address(address)
        self._channel = open_aio_channel(self.address, token)
        self.local_admin = is_local_admin(self.address, token)
        self._closed = False
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(self._channel)
        self.direct = open_direct(AsyncDirectChannel, self.address, token, direct)

    def _check_open(self) -> None:
        if self._closed:
            raise errors.FailedPrecondition(
                f"the connection to the engine daemon at {self.address} is closed;"
                " attach again with AsyncSandbox.connect(sandbox_id)"
            )

    async def call(
        self, method: str, request: Any, *, timeout: float | None = None
    ) -> Any:
        self._check_open()
        if self.direct is not None:
            try:
                return await self.direct.call(method, request, timeout)
            except DirectUnreachable:
                pass
        try:
            return await getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None

    async def stream(self, method: str, request: Any) -> AsyncIterator[Any]:
        """Iterate a server-streaming RPC, cancelling it when the iterator is closed."""
        self._check_open()
        if self.direct is not None:
            try:
                responses = await self.direct.start_stream(method, request)
            except DirectUnreachable:
                pass
            else:
                async with contextlib.aclosing(responses):
                    async for message in responses:
                        yield message
                return
        call = getattr(self.stub, method)(request)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        self._closed = True
        if self.direct is not None:
            await self.direct.close()
        await self._channel.close()


class AsyncSandboxProcessStream(OutputCursor):
    """One output stream of a process, read from this reader's own offset."""

    _process: AsyncSandboxProcess

    async def iter_bytes(self, follow: bool = True) -> AsyncIterator[bytes]:
        """Yield bytes as they arrive, or without ``follow`` only those buffered now."""
        if self._eof:
            return
        request = pb.ReadOutputRequest(
            sandbox_id=self._process.sandbox_id,
            pid=self._process.pid,
            stream=convert.STREAMS[self._stream],
            offset=self._offset,
            follow=follow,
        )
        chunks = self._process._client.stream("ReadOutput", request)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if chunk.dropped:
                    self._note_dropped(chunk.dropped)
                self._offset = chunk.offset + len(chunk.data)
                if chunk.eof:
                    self._eof = True
                if chunk.data:
                    yield chunk.data

    async def read_bytes(self) -> bytes:
        """Return every byte from this reader's offset up to the end of the stream."""
        return await self._collect(follow=True)

    async def read(self) -> str:
        return (await self.read_bytes()).decode("utf-8", errors="replace")

    async def read_available(self) -> bytes:
        """Return the bytes buffered now, without waiting for more."""
        return await self._collect(follow=False)

    async def _collect(self, *, follow: bool) -> bytes:
        parts = [self._pending]
        self._pending = b""
        async with contextlib.aclosing(self.iter_bytes(follow=follow)) as chunks:
            async for data in chunks:
                parts.append(data)
        return b"".join(parts)

    async def iter_lines_bytes(self) -> AsyncIterator[bytes]:
        """Yield lines as bytes, as they arrive, each with its trailing newline."""
        async with contextlib.aclosing(self.iter_bytes(follow=True)) as chunks:
            async for data in chunks:
                self._pending += data
                while (end := self._pending.find(b"\n")) >= 0:
                    line = self._pending[: end + 1]
                    self._pending = self._pending[end + 1 :]
                    yield line
        if self._pending:
            line, self._pending = self._pending, b""
            yield line

    async def __aiter__(self) -> AsyncIterator[str]:
        async with contextlib.aclosing(self.iter_lines_bytes()) as lines:
            async for line in lines:
                yield line.decode("utf-8", errors="replace")


class AsyncSandboxProcessStdin:
    def __init__(self, process: AsyncSandboxProcess) -> None:
        self._process = process

    async def write(self, data: str | bytes) -> None:
        """Write ``data`` (str is encoded as UTF-8) and return once the pipe has it."""
        if isinstance(data, str):
            data = data.encode()
        view = memoryview(data)
        for start in range(0, max(len(view), 1), STDIN_CHUNK_BYTES):
            await self._process._client.call(
                "WriteStdin",
                pb.WriteStdinRequest(
                    sandbox_id=self._process.sandbox_id,
                    pid=self._process.pid,
                    data=bytes(view[start : start + STDIN_CHUNK_BYTES]),
                ),
            )

    async def close(self) -> None:
        await self._process._client.call(
            "CloseStdin",
            pb.CloseStdinRequest(
                sandbox_id=self._process.sandbox_id, pid=self._process.pid
            ),
        )


class AsyncSandboxProcess:
    """A process started by ``await sb.process.exec(...)``."""

    def __init__(self, client: AsyncClient, sandbox_id: str, pid: int) -> None:
        self._client = client
        self.sandbox_id = sandbox_id
        self.pid = pid
        self.stdout = AsyncSandboxProcessStream(self, Stream.STDOUT)
        self.stderr = AsyncSandboxProcessStream(self, Stream.STDERR)
        self.stdin = AsyncSandboxProcessStdin(self)

    def __repr__(self) -> str:
        return f"AsyncSandboxProcess(sandbox_id={self.sandbox_id!r}, pid={self.pid})"

    async def info(self, timeout: float | None = 0) -> ProcessInfo:
        request = pb.WaitRequest(sandbox_id=self.sandbox_id, pid=self.pid)
        if timeout is not None:
            request.timeout_seconds = timeout
        reply = await self._client.call("Wait", request)
        return convert.process_from_proto(reply.process)

    async def wait(self, timeout: float | None = None) -> int:
        """Return the exit code, or raise DeadlineExceeded after ``timeout`` s."""
        info = await self.info(timeout=timeout)
        if info.exit_code is None:
            raise errors.DeadlineExceeded(
                f"pid {self.pid} in sandbox {self.sandbox_id} still runs after"
                f" {timeout} s"
            )
        return info.exit_code

    async def status(self) -> ProcessStatus:
        return ProcessStatus.from_info(await self.info(timeout=0))

    async def kill(self, signal: int = signal_module.SIGKILL) -> None:
        await self._client.call(
            "Kill",
            pb.KillRequest(
                sandbox_id=self.sandbox_id, pid=self.pid, signal=int(signal)
            ),
        )


class AsyncSandboxProcessManager:
    def __init__(self, client: AsyncClient, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    async def exec(
        self,
        *args: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        secrets: list[str] | None = None,
    ) -> AsyncSandboxProcess:
        """Start ``args`` and return once it runs, like SandboxProcessManager.exec."""
        request = pb.ExecRequest(
            sandbox_id=self._sandbox_id,
            argv=_argv(args),
            cwd=cwd or "",
            env=env or {},
            stdin=stdin,
            secrets=_secret_names(secrets),
        )
        if timeout is not None:
            request.timeout_seconds = timeout
        events = self._client.stream("Exec", request)
        async with contextlib.aclosing(events):
            first = await anext(events, None)
        if first is None or first.WhichOneof("event") != "started":
            raise errors.InternalError(
                f"the daemon's Exec stream in sandbox {self._sandbox_id} did not start"
                " with a started event"
            )
        return AsyncSandboxProcess(self._client, self._sandbox_id, first.started.pid)

    async def run_code(
        self,
        code: str,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
    ) -> SandboxProcessResponse:
        return await self.run("python3", "-c", code, timeout=timeout, env=env)

    async def run(
        self,
        *args: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        secrets: list[str] | None = None,
    ) -> SandboxProcessResponse:
        """Run ``args`` to its exit and return its output; see SandboxProcessManager."""
        request = run_request(
            self._sandbox_id, args, cwd=cwd, env=env, timeout=timeout, secrets=secrets
        )
        reply = await self._client.call("Run", request)
        process = AsyncSandboxProcess(self._client, self._sandbox_id, reply.pid)
        process.stdout.resume_after(reply.stdout)
        process.stderr.resume_after(reply.stderr)
        # The process has exited: what is not buffered now never arrives in
        # the response's time, so read without following.
        stdout = reply.stdout.data + await process.stdout.read_available()
        stderr = reply.stderr.data + await process.stderr.read_available()
        return SandboxProcessResponse(
            pid=reply.pid,
            exit_code=reply.exit.exit_code,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            stdout_dropped=process.stdout.dropped,
            stderr_dropped=process.stderr.dropped,
        )

    async def get_process(self, pid: int) -> AsyncSandboxProcess:
        await self._client.call(
            "Wait",
            pb.WaitRequest(sandbox_id=self._sandbox_id, pid=pid, timeout_seconds=0),
        )
        return AsyncSandboxProcess(self._client, self._sandbox_id, pid)

    async def list_processes(self) -> dict[int, ProcessInfo]:
        reply = await self._client.call(
            "ListProcesses", pb.ListProcessesRequest(sandbox_id=self._sandbox_id)
        )
        return {p.pid: convert.process_from_proto(p) for p in reply.processes}


class AsyncSandboxInstance:
    """A created or connected sandbox. ``async with`` terminates it on exit."""

    def __init__(self, client: AsyncClient, info: SandboxInfo) -> None:
        self._client = client
        self.sandbox_id = info.sandbox_id
        self.process = AsyncSandboxProcessManager(client, info.sandbox_id)
        # Files and directories: await sb.fs.upload_file(...).
        self.fs = AsyncSandboxFileSystem(client, info.sandbox_id)

    def __repr__(self) -> str:
        return f"AsyncSandboxInstance(sandbox_id={self.sandbox_id!r})"

    @property
    def address(self) -> str:
        return self._client.address

    async def status(self) -> SandboxInfo:
        reply = await self._client.call(
            "Get", pb.GetRequest(sandbox_id=self.sandbox_id)
        )
        return convert.sandbox_from_proto(reply.sandbox)

    async def update_ttl(self, ttl: float) -> SandboxInfo:
        reply = await self._client.call(
            "UpdateTTL",
            pb.UpdateTTLRequest(sandbox_id=self.sandbox_id, ttl_seconds=ttl),
        )
        return convert.sandbox_from_proto(reply.sandbox)

    async def update_network_permissions(
        self, *, block_network: bool = False, allow_list: list[str] | None = None
    ) -> SandboxInfo:
        """Replace the egress policy; open connections it forbids are cut."""
        reply = await self._client.call(
            "UpdateNetworkPermissions",
            network_request(self.sandbox_id, block_network, allow_list),
        )
        return convert.sandbox_from_proto(reply.sandbox)

    async def expose_port(self, port: int) -> str:
        """Forward a host TCP port to ``port`` inside the sandbox; return its URL."""
        reply = await self._client.call(
            "ExposePort", pb.ExposePortRequest(sandbox_id=self.sandbox_id, port=port)
        )
        return reply.url

    async def list_urls(self) -> dict[int, str]:
        """Return exposed port inside the sandbox -> URL."""
        reply = await self._client.call(
            "ListUrls", pb.ListUrlsRequest(sandbox_id=self.sandbox_id)
        )
        return dict(reply.urls)

    async def stats(self) -> SandboxStats:
        reply = await self._client.call(
            "Stats", pb.StatsRequest(sandbox_id=self.sandbox_id)
        )
        return convert.stats_from_proto(reply)

    async def terminate(self) -> SandboxInfo:
        reply = await self._client.call(
            "Terminate", pb.TerminateRequest(sandbox_id=self.sandbox_id)
        )
        return convert.sandbox_from_proto(reply.sandbox)

    async def close(self) -> None:
        """Close the connection to the daemon, leaving the sandbox running."""
        await self._client.close()

    async def __aenter__(self) -> AsyncSandboxInstance:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.terminate()
        finally:
            await self.close()


class AsyncSandbox:
    """Settings of a sandbox to create; the arguments are those of ``Sandbox``."""

    def __init__(self, image: str = "host", **settings: Any) -> None:
        self._settings = Sandbox(image, **settings)

    async def create(self) -> AsyncSandboxInstance:
        client = AsyncClient(self._settings.address)
        try:
            reply = await client.call(
                "Create", pb.CreateRequest(spec=self._settings.spec_proto())
            )
        except BaseException:
            await client.close()
            raise
        return AsyncSandboxInstance(client, convert.sandbox_from_proto(reply.sandbox))

    @staticmethod
    async def connect(
        sandbox_id: str, *, address: str | None = None
    ) -> AsyncSandboxInstance:
        """Attach to an existing sandbox; raises NotFound when there is none."""
        client = AsyncClient(address)
        try:
            reply = await client.call("Get", pb.GetRequest(sandbox_id=sandbox_id))
        except BaseException:
            await client.close()
            raise
        return AsyncSandboxInstance(client, convert.sandbox_from_proto(reply.sandbox))

    @staticmethod
    async def list(
        *,
        address: str | None = None,
        state: SandboxState | None = None,
        labels: dict[str, str] | None = None,
        name: str = "",
    ) -> list[SandboxInfo]:
        request = pb.ListRequest(labels=labels or {}, name=name)
        if state is not None:
            request.state = convert.SANDBOX_STATES[state]
        client = AsyncClient(address)
        try:
            reply = await client.call("List", request)
        finally:
            await client.close()
        return [convert.sandbox_from_proto(s) for s in reply.sandboxes]
