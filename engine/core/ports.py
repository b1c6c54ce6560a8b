"""Exposed ports: TCP forwarders from the host into a sandbox's own loopback.

A forwarder listens on ``host`` (127.0.0.1 unless configured) in the host's
network namespace. Its accept thread then moves itself into the sandbox's
network namespace with setns(2), which changes only the calling thread, so
every socket it creates afterwards connects to the sandbox's 127.0.0.1. The
sandbox's interfaces and nftables rules play no part: an exposed port works
for a sandbox with blocked egress or with no interface but loopback, and a
service that listens on 127.0.0.1 inside is reachable. Ports that are not
exposed have no forwarder, and the engine's nftables rules drop connections
into the bridge from anywhere else.

Bytes move with splice(2) through a pipe, in one thread per direction, so
they never enter Python's memory.

For a sandbox with a veth pair and an IPv4 ``host``, the forwarder also
calls ``Network.expose``. The kernel then translates connections opened on
the host itself to the same 127.0.0.1:port inside, through the veth pair,
which costs less CPU per byte than the forwarder's second TCP connection
(docs/benchmarks.md has the measured throughput). Those connections never
reach the listening socket, which stays open to hold the port and to serve
clients on other hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

from engine.errors import EngineError
from engine.runtime import libc

if TYPE_CHECKING:
    from engine.core.network import Attachment, Network

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
SPLICE_F_MOVE = 1
LISTEN_BACKLOG = 128
# Connections one forwarder carries at once; more wait in the listen backlog.
MAX_CONNECTIONS = 256


class PortForwarder:
    """Forwards TCP connections on ``url`` to port ``port`` of one sandbox."""

    def __init__(
        self,
        netns_fd: int,
        port: int,
        host: str,
        label: str,
        *,
        network: Network | None = None,
        attachment: Attachment | None = None,
    ) -> None:
        """Listen on ``host`` and forward to ``port`` in the namespace ``netns_fd``.

        With ``network`` and the sandbox's ``attachment``, connections from
        the host itself take the kernel path as well, where ``host`` is an
        IPv4 address. If that setup fails, the error is logged and every
        connection goes through the forwarder. The setup blocks for a few
        milliseconds: it runs a thread in the sandbox's namespace and two
        nftables transactions.
        """
        self.port = port
        self.label = label
        self._netns_fd = os.dup(netns_fd)
        self._listener = socket.create_server(
            (host, 0), backlog=LISTEN_BACKLOG, reuse_port=False
        )
        address = self._listener.getsockname()
        self.host, self.host_port = address[0], address[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._network: Network | None = None
        if network is not None and attachment is not None:
            self._start_kernel_path(network, attachment)
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"expose-{label}-{port}", daemon=True
        )
        self._thread.start()

    @property
    def kernel_path(self) -> bool:
        """Whether the kernel translates connections from the host to this port."""
        return self._network is not None

    def _start_kernel_path(self, network: Network, attachment: Attachment) -> None:
        address = ipaddress.ip_address(self.host)
        # An IPv6 URL cannot be translated to the sandbox's IPv4 address, and
        # a wildcard one has no single destination address to match.
        if address.version != 4 or address.is_unspecified:
            return
        try:
            network.expose(
                self._netns_fd, attachment, address, self.host_port, self.port
            )
        except (EngineError, OSError) as error:
            log.warning(
                "%s: port %d: kernel path not set up, so every connection goes "
                "through the forwarder: %s",
                self.label,
                self.port,
                error,
            )
            return
        self._network = network

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.host_port}"

    def _accept_loop(self) -> None:
        try:
            # Only this thread enters the sandbox's network namespace.
            libc.setns(self._netns_fd, CLONE_NEWNET)
        except OSError as error:
            log.error("%s: port %d: setns failed: %s", self.label, self.port, error)
            return
        finally:
            os.close(self._netns_fd)
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._slots.acquire()
            # _connect releases the slot on every path.
            self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        inner = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            inner.connect(("127.0.0.1", self.port))
            for sock in (client, inner):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as error:
            log.info(
                "%s: port %d: connect inside failed: %s",
                self.label,
                self.port,
                error.strerror,
            )
            inner.close()
            client.close()
            self._slots.release()
            return
        with self._lock:
            if self._closed:
                client.close()
                inner.close()
                self._slots.release()
                return
            self._sockets.update((client, inner))
        pending = [2]

        def finished() -> None:
            with self._lock:
                pending[0] -= 1
                if pending[0]:
                    return
                self._sockets.discard(client)
                self._sockets.discard(inner)
            client.close()
            inner.close()
            self._slots.release()

        started = 0
        try:
            for source, target in ((client, inner), (inner, client)):
                threading.Thread(
                    target=_pump, args=(source, target, finished), daemon=True
                ).start()
                started += 1
        except RuntimeError as error:
            # No thread could be started: end this connection, and stand in
            # for each pump that never ran.
            log.error("%s: port %d: %s", self.label, self.port, error)
            for sock in (client, inner):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            for _ in range(2 - started):
                finished()

    def close(self) -> None:
        """Stop accepting and cut every open connection, on both paths."""
        network, self._network = self._network, None
        if network is not None:
            address = ipaddress.IPv4Address(self.host)
            try:
                network.unexpose(address, self.host_port)
            except (EngineError, OSError) as error:
                # Network.remove deletes the element with the sandbox's chain.
                log.error(
                    "%s: port %d: kernel path not removed: %s",
                    self.label,
                    self.port,
                    error,
                )
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5.0)


def _pump(source: socket.socket, target: socket.socket, finished) -> None:  # type: ignore[no-untyped-def]
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_BYTES)
        source_fd, target_fd = source.fileno(), target.fileno()
        while True:
            moved = os.splice(source_fd, write_end, PIPE_BYTES, flags=SPLICE_F_MOVE)
            if moved == 0:
                break
            # No SPLICE_F_MORE: it would let TCP hold back a short message,
            # such as a request that waits for its reply.
            while moved:
                moved -= os.splice(read_end, target_fd, moved, flags=SPLICE_F_MOVE)
        # End of stream: pass it on, and let the other direction finish.
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
    except OSError:
        # A reset on either side ends both directions.
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
    finally:
        os.close(read_end)
        os.close(write_end)
        finished()
