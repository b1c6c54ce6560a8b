"""An Engine and its gRPC server inside the calling process, without a daemon.

    from engine import Sandbox
    from engine.sdk.embedded import EmbeddedEngine

    with EmbeddedEngine(data_dir="/var/tmp/my-service-engine") as embedded:
        with Sandbox(address=embedded.address).create() as sb:
            ...

The Engine runs on its own asyncio event loop in a background thread and serves
on a unix socket in a private temporary directory (mode 0700), so the sync SDK
talks to it exactly as it talks to a daemon.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.config import Config
from engine.errors import FailedPrecondition, Unavailable

if TYPE_CHECKING:
    from engine.core.engine import Engine
    from engine.server.app import Server

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds that running RPCs get to finish when the embedded engine stops.
STOP_GRACE_SECONDS = 2.0
# Seconds to wait for the Engine to start or stop before giving up.
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 60.0


def _private_socket_dir() -> Path:
    """Create a 0700 directory for the socket, short enough for a unix socket path."""
    directory = Path(tempfile.mkdtemp(prefix="engine-"))
    if len(os.fsencode(directory / "engine.sock")) > 100:
        shutil.rmtree(directory)
        directory = Path(tempfile.mkdtemp(prefix="engine-", dir="/tmp"))
    return directory


class EmbeddedEngine:
    """Run an Engine plus a gRPC server on a private unix socket in a thread.

    ``address`` is the server's "unix:/path" address, for
    ``Sandbox(address=...)``. ``stop`` (or leaving the ``with`` block)
    terminates every sandbox and removes the socket directory.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str] | None = None, **settings: Any
    ) -> None:
        # settings: other fields of engine.config.Config, such as dns_servers.
        self.config = Config.from_data_dir(data_dir, **settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._server: Server | None = None
        self._stopped: asyncio.Event | None = None
        self._socket_dir: Path | None = None
        self._started = concurrent.futures.Future[str]()
        self._address: str | None = None

    @property
    def address(self) -> str:
        if self._address is None:
            raise FailedPrecondition(
                "the embedded engine is not running; call start() first"
            )
        return self._address

    @property
    def engine(self) -> Engine:
        """The Engine. Its coroutines must run on its loop, for example via ``run``."""
        if self._engine is None:
            raise FailedPrecondition(
                "the embedded engine is not running; call start() first"
            )
        return self._engine

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the engine's event loop and return its result."""
        if self._loop is None:
            coroutine.close()
            raise FailedPrecondition(
                "the embedded engine is not running; call start() first"
            )
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> EmbeddedEngine:
        """Start the Engine and the server; return once the server accepts calls."""
        if self._thread is not None:
            raise FailedPrecondition("the embedded engine was already started")
        self._socket_dir = _private_socket_dir()
        self._thread = threading.Thread(
            target=self._run, name="engine-embedded", daemon=True
        )
        self._thread.start()
        try:
            self._address = self._started.result(START_TIMEOUT_SECONDS)
        except concurrent.futures.TimeoutError:
            raise Unavailable(
                f"the embedded engine did not start within {START_TIMEOUT_SECONDS} s"
            ) from None
        except BaseException:
            self._thread.join(STOP_TIMEOUT_SECONDS)
            self._remove_socket_dir()
            raise
        logger.info(
            "embedded engine serving on %s (data dir %s)",
            self._address,
            self.config.data_dir,
        )
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:
            if not self._started.done():
                self._started.set_exception(error)
            else:
                logger.exception("embedded engine failed")

    async def _main(self) -> None:
        from engine.core.engine import Engine
        from engine.server.app import create_server

        assert self._socket_dir is not None
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        engine = Engine(self.config)
        server, addresses = create_server(
            engine, socket_path=self._socket_dir / "engine.sock"
        )
        try:
            await engine.start()
        except BaseException:
            server.remove_socket()
            raise
        self._engine = engine
        self._server = server
        try:
            await server.start()
            self._started.set_result(addresses["unix"])
            await self._stopped.wait()
        finally:
            stop_server = asyncio.create_task(server.stop(STOP_GRACE_SECONDS))
            try:
                await engine.close()
            finally:
                await stop_server
                self._engine = None
                self._server = None

    def stop(self) -> None:
        """Terminate every sandbox, stop the server and remove the socket directory."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(STOP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            logger.error(
                "embedded engine did not stop within %s s; leaving its thread running",
                STOP_TIMEOUT_SECONDS,
            )
        self._thread = None
        self._loop = None
        self._address = None
        self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> EmbeddedEngine:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
