"""The SandboxService servicer: request checks, then one Engine call per RPC.

Exceptions propagate to ``engine.server.interceptor.ErrorInterceptor``, which
turns them into gRPC statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import grpc

from engine.core.models import OutputChunk, ProcessInfo, Stream
from engine.errors import InvalidArgument
from engine.server import convert, validation
from engine.v1 import sandbox_pb2 as pb
from engine.v1 import sandbox_pb2_grpc

if TYPE_CHECKING:
    from engine.core.engine import Engine

logger = logging.getLogger(__name__)

# Output is sent in messages of at most this many data bytes, well below the
# 4 MiB that gRPC clients accept by default.
MAX_CHUNK_BYTES = 1024 * 1024


def split_chunk(
    chunk: OutputChunk, limit: int = MAX_CHUNK_BYTES
) -> Iterator[pb.OutputChunk]:
    """Yield ``chunk`` as messages of at most ``limit`` data bytes each.

    ``dropped`` goes on the first message and ``eof`` on the last.
    """
    data = chunk.data
    if len(data) <= limit:
        yield convert.chunk_to_proto(chunk)
        return
    stream = convert.STREAMS[chunk.stream]
    for start in range(0, len(data), limit):
        yield pb.OutputChunk(
            stream=stream,
            offset=chunk.offset + start,
            data=data[start : start + limit],
            dropped=chunk.dropped if start == 0 else 0,
            eof=chunk.eof and start + limit >= len(data),
        )


class SandboxServicer(sandbox_pb2_grpc.SandboxServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Create(
        self, request: pb.CreateRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateResponse:
        spec = validation.spec_from_request(request.spec)
        info = await self._engine.create_sandbox(spec)
        return pb.CreateResponse(sandbox=convert.sandbox_to_proto(info))

    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResponse:
        validation.check_sandbox_id(request.sandbox_id)
        info = await self._engine.get_sandbox(request.sandbox_id)
        return pb.GetResponse(sandbox=convert.sandbox_to_proto(info))

    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListResponse:
        state = None
        if request.state != pb.SANDBOX_STATE_UNSPECIFIED:
            state = convert.SANDBOX_STATES_FROM_PROTO.get(request.state)
            if state is None:
                raise InvalidArgument(f"invalid state {request.state}")
        labels = dict(request.labels)
        for key, value in labels.items():
            validation.check_name("labels key", key)
            validation.check_text(f"labels[{validation.show(key)}]", value)
        validation.check_text("name", request.name)
        infos = await self._engine.list_sandboxes(
            state=state, labels=labels or None, name=request.name or None
        )
        return pb.ListResponse(sandboxes=[convert.sandbox_to_proto(i) for i in infos])

    async def Terminate(
        self, request: pb.TerminateRequest, context: grpc.aio.ServicerContext
    ) -> pb.TerminateResponse:
        validation.check_sandbox_id(request.sandbox_id)
        info = await self._engine.terminate_sandbox(request.sandbox_id)
        return pb.TerminateResponse(sandbox=convert.sandbox_to_proto(info))

    async def UpdateTTL(
        self, request: pb.UpdateTTLRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateTTLResponse:
        validation.check_sandbox_id(request.sandbox_id)
        ttl = validation.check_ttl("ttl_seconds", request.ttl_seconds)
        info = await self._engine.update_ttl(request.sandbox_id, ttl)
        return pb.UpdateTTLResponse(sandbox=convert.sandbox_to_proto(info))

    async def UpdateNetworkPermissions(
        self,
        request: pb.UpdateNetworkPermissionsRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.UpdateNetworkPermissionsResponse:
        validation.check_sandbox_id(request.sandbox_id)
        info = await self._engine.update_network_permissions(
            request.sandbox_id,
            block_network=request.block_network,
            allow_list=tuple(request.allow_list),
        )
        return pb.UpdateNetworkPermissionsResponse(
            sandbox=convert.sandbox_to_proto(info)
        )

    async def ExposePort(
        self, request: pb.ExposePortRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExposePortResponse:
        validation.check_sandbox_id(request.sandbox_id)
        url = await self._engine.expose_port(request.sandbox_id, request.port)
        return pb.ExposePortResponse(url=url)

    async def ListUrls(
        self, request: pb.ListUrlsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListUrlsResponse:
        validation.check_sandbox_id(request.sandbox_id)
        urls = await self._engine.list_urls(request.sandbox_id)
        return pb.ListUrlsResponse(urls=urls)

    async def Exec(
        self, request: pb.ExecRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExecEvent]:
        arguments = validation.exec_from_request(request)
        info = await self._start(arguments)
        yield pb.ExecEvent(started=pb.ExecStarted(pid=info.pid))

        # A cancelled stream ends here without touching the process: it keeps
        # running, and ReadOutput and Wait still reach it.
        final = None
        async for item in self._exec_output(arguments.sandbox_id, info.pid):
            if isinstance(item, pb.OutputChunk):
                yield pb.ExecEvent(output=item)
            else:
                final = item
        assert final is not None
        yield pb.ExecEvent(exit=convert.exit_to_proto(final))

    async def Run(
        self, request: pb.RunRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunResponse:
        arguments, limit = validation.run_from_request(request)
        info = await self._start(arguments)
        try:
            final, stdout, stderr = await self._engine.finish_process(
                arguments.sandbox_id, info.pid
            )
        except asyncio.CancelledError:
            # The caller gave up (deadline or cancel) before it learnt the pid,
            # so nothing could stop the process but its timeout.
            self._engine.kill_abandoned(arguments.sandbox_id, info.pid)
            raise
        return pb.RunResponse(
            pid=info.pid,
            exit=convert.exit_to_proto(final),
            stdout=convert.chunk_to_proto(stdout.read(0, limit)),
            stderr=convert.chunk_to_proto(stderr.read(0, limit)),
        )

    async def _start(self, arguments: validation.ExecArguments) -> ProcessInfo:
        """Start the process of an Exec or Run request and return its info."""
        info = await self._engine.exec(
            arguments.sandbox_id,
            arguments.argv,
            cwd=arguments.cwd,
            env=arguments.env,
            timeout=arguments.timeout,
            stdin=arguments.stdin,
            secrets=arguments.secrets,
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "started pid %d in sandbox %s: %s",
                info.pid,
                arguments.sandbox_id,
                validation.show(" ".join(arguments.argv)),
            )
        return info

    async def _exec_output(
        self, sandbox_id: str, pid: int
    ) -> AsyncIterator[pb.OutputChunk | ProcessInfo]:
        """Yield stdout and stderr chunks as they arrive, then the final ProcessInfo.

        Engine.follow_process ends the output at both EOFs, or at most
        OUTPUT_GRACE_SECONDS after the exit if a background child keeps a
        pipe open.
        """
        async for item in self._engine.follow_process(sandbox_id, pid):
            if isinstance(item, OutputChunk):
                for message in split_chunk(item):
                    yield message
            else:
                yield item

    async def WriteStdin(
        self, request: pb.WriteStdinRequest, context: grpc.aio.ServicerContext
    ) -> pb.WriteStdinResponse:
        validation.check_sandbox_id(request.sandbox_id)
        validation.check_pid(request.pid)
        await self._engine.write_stdin(request.sandbox_id, request.pid, request.data)
        return pb.WriteStdinResponse()

    async def CloseStdin(
        self, request: pb.CloseStdinRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseStdinResponse:
        validation.check_sandbox_id(request.sandbox_id)
        validation.check_pid(request.pid)
        await self._engine.close_stdin(request.sandbox_id, request.pid)
        return pb.CloseStdinResponse()

    async def Wait(
        self, request: pb.WaitRequest, context: grpc.aio.ServicerContext
    ) -> pb.WaitResponse:
        validation.check_sandbox_id(request.sandbox_id)
        validation.check_pid(request.pid)
        timeout = validation.wait_timeout(request)
        info = await self._engine.wait(request.sandbox_id, request.pid, timeout=timeout)
        return pb.WaitResponse(process=convert.process_to_proto(info))

    async def Kill(
        self, request: pb.KillRequest, context: grpc.aio.ServicerContext
    ) -> pb.KillResponse:
        validation.check_sandbox_id(request.sandbox_id)
        validation.check_pid(request.pid)
        number = validation.signal_number(request)
        await self._engine.kill(request.sandbox_id, request.pid, number)
        return pb.KillResponse()

    async def ListProcesses(
        self, request: pb.ListProcessesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListProcessesResponse:
        validation.check_sandbox_id(request.sandbox_id)
        infos = await self._engine.list_processes(request.sandbox_id)
        return pb.ListProcessesResponse(
            processes=[convert.process_to_proto(i) for i in infos]
        )

    async def ReadOutput(
        self, request: pb.ReadOutputRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.OutputChunk]:
        validation.check_sandbox_id(request.sandbox_id)
        validation.check_pid(request.pid)
        stream = validation.stream_from_request(request.stream)
        if not request.follow:
            async for message in self._read_buffered(
                request.sandbox_id, request.pid, stream, request.offset
            ):
                yield message
            return
        chunks = self._engine.read_output(
            request.sandbox_id, request.pid, stream, offset=request.offset, follow=True
        )
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                for message in split_chunk(chunk):
                    yield message

    async def _read_buffered(
        self, sandbox_id: str, pid: int, stream: Stream, offset: int
    ) -> AsyncIterator[pb.OutputChunk]:
        """Yield every byte buffered now from ``offset``, without waiting for more.

        Engine.read_output without follow returns one bounded chunk, so this
        repeats it until a chunk is empty or has eof set.
        """
        while True:
            chunks = self._engine.read_output(
                sandbox_id, pid, stream, offset=offset, follow=False
            )
            async with contextlib.aclosing(chunks):
                chunk = await anext(chunks)
            for message in split_chunk(chunk):
                yield message
            if chunk.eof or not chunk.data:
                return
            offset = chunk.offset + len(chunk.data)

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        validation.check_sandbox_id(request.sandbox_id)
        stats = await self._engine.stats(request.sandbox_id)
        return convert.stats_to_proto(stats)
