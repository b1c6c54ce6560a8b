"""Run the engine daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
from pathlib import Path

from engine.config import Config

logger = logging.getLogger(__name__)

# Seconds that running RPCs get to finish when the daemon stops.
STOP_GRACE_SECONDS = 5.0


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the old and new soft one.

    The daemon keeps two descriptors open per sandbox (the supervisor's
    control socket and its network namespace), and the zygote, which inherits
    this limit, one pidfd per supervisor. With the soft limit of 1024 that
    shells often set, creating sandboxes failed at the 490th
    (benchmarks.density on Linux 6.18).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # The kernel rejects a soft limit above fs.nr_open.
        target = int(Path("/proc/sys/fs/nr_open").read_text())
    else:
        target = hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as error:
        logger.warning(
            "failed to raise the open file limit (RLIMIT_NOFILE) from %d to %d,"
            " so creating sandboxes may fail past a few hundred: %s",
            soft,
            target,
            error,
        )
        return soft, soft
    logger.info(
        "raised the open file limit (RLIMIT_NOFILE) from %d to %d", soft, target
    )
    return soft, target


async def serve(
    config: Config,
    *,
    socket_path: str | os.PathLike[str] | None = None,
    listen: str | None = None,
    http: str | None = None,
    grace: float = STOP_GRACE_SECONDS,
) -> None:
    """Start an Engine and its gRPC server, and stop both on SIGTERM or SIGINT.

    ``socket_path`` defaults to the data dir's engine.sock. The socket is bound
    before the Engine starts, so a second daemon on the same socket fails
    before it touches the data dir. ``http`` is a HOST:PORT for the
    Beam-compatible HTTP routes, bound before the Engine starts as well.
    """
    from engine.core.engine import Engine
    from engine.core.functions import for_engine
    from engine.server.app import create_server
    from engine.server.http import bind as bind_http
    from engine.server.http import serve_http

    # Before the Engine starts its zygote, which inherits the limit.
    raise_open_file_limit()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    received: list[str] = []

    def request_stop(signum: int) -> None:
        received.append(signal.Signals(signum).name)
        stop_requested.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)

    config.data_dir.mkdir(parents=True, exist_ok=True)
    path = Path(socket_path) if socket_path is not None else config.socket_path
    engine = Engine(config)
    server, addresses = create_server(engine, socket_path=path, listen=listen)
    try:
        http_socket = bind_http(http) if http is not None else None
    except BaseException:
        server.remove_socket()
        raise
    try:
        await engine.start()
    except BaseException:
        server.remove_socket()
        if http_socket is not None:
            http_socket.close()
        raise
    functions = for_engine(engine)
    stack = contextlib.AsyncExitStack()

    try:
        await functions.start()
        stack.push_async_callback(functions.close)
        await server.start()
        if http_socket is not None:
            addresses["http"] = "http://" + await stack.enter_async_context(
                serve_http(engine, http_socket)
            )
        served = list(addresses.values())
        if server.direct is not None:
            served.append(f"direct {server.direct.path}")
        logger.info(
            "engine daemon serving on %s (data dir %s, pid %d)",
            ", ".join(served),
            config.data_dir,
            os.getpid(),
        )
        await stop_requested.wait()
        logger.info("stopping on %s", received[0] if received else "request")
    finally:
        # Terminating the sandboxes ends their processes' output streams, so
        # the Exec and ReadOutput streams still open finish during the grace.
        stop_server = asyncio.create_task(server.stop(grace))
        try:
            # The HTTP server stops first, then the task queues and the
            # deployments' containers, then the Engine.
            await stack.aclose()
            await engine.close()
        finally:
            await stop_server
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
    logger.info("engine daemon stopped")
