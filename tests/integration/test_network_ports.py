"""Exposed ports: URLs on the host that reach a port inside a sandbox.

The forwarder connects to the sandbox's own 127.0.0.1, so exposing works for
a sandbox with blocked egress. A port that is not exposed is unreachable from
the host and from the test's remote host namespace.
"""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from engine import Sandbox, SandboxInstance
from engine.core.engine import MAX_EXPOSED_PORTS
from engine.errors import InvalidArgument, ResourceExhausted

# Serves one greeting per connection on (host, port) until killed.
GREETER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    client, _ = server.accept()
    with client:
        client.sendall(b"hello from " + sys.argv[3].encode())
"""


def start_greeter(sb: SandboxInstance, host: str, port: int) -> None:
    process = sb.process.exec("python3", "-c", GREETER, host, str(port), sb.sandbox_id)
    deadline = time.monotonic() + 10
    output = b""
    while b"listening" not in output:
        assert time.monotonic() < deadline, f"greeter did not start: {output!r}"
        output += process.stdout.read_available()
        time.sleep(0.05)


def fetch(url: str) -> bytes:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def test_expose_port_returns_url(network_daemon: Any) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        start_greeter(sb, "127.0.0.1", 8080)
        url = sb.expose_port(8080)
        assert urlsplit(url).hostname == "127.0.0.1"
        assert fetch(url) == f"hello from {sb.sandbox_id}".encode()
        # Every connection gets its own forward.
        assert fetch(url) == f"hello from {sb.sandbox_id}".encode()
        assert sb.expose_port(8080) == url
        assert sb.list_urls() == {8080: url}
        assert sb.status().urls == {8080: url}
        # Blocking egress leaves exposed ports working.
        sb.update_network_permissions(block_network=True)
        assert fetch(url) == f"hello from {sb.sandbox_id}".encode()


ECHO = """
import socket
server = socket.create_server(("127.0.0.1", 8090))
print("listening", flush=True)
client, _ = server.accept()
while data := client.recv(4096):
    client.sendall(data)
"""


def test_exposed_port_carries_dialogue(network_daemon: Any) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        process = sb.process.exec("python3", "-c", ECHO)
        output = b""
        deadline = time.monotonic() + 10
        while b"listening" not in output:
            assert time.monotonic() < deadline, "echo server did not start"
            output += process.stdout.read_available()
            time.sleep(0.05)
        parts = urlsplit(sb.expose_port(8090))
        assert parts.hostname is not None and parts.port is not None
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as conn:
            # Short messages in both directions, with the connection open.
            for word in (b"one", b"two", b"three"):
                conn.sendall(word)
                assert conn.recv(64) == word
            big = bytes(range(256)) * 4096
            conn.sendall(big)
            received = b""
            while len(received) < len(big):
                received += conn.recv(1 << 16)
            assert received == big


def test_expose_port_with_blocked_egress(network_daemon: Any) -> None:
    with Sandbox(address=network_daemon.address, block_network=True).create() as sb:
        start_greeter(sb, "0.0.0.0", 9000)
        url = sb.expose_port(9000)
        assert fetch(url) == f"hello from {sb.sandbox_id}".encode()


def test_url_closed_after_terminate(network_daemon: Any) -> None:
    sb = Sandbox(address=network_daemon.address).create()
    try:
        start_greeter(sb, "127.0.0.1", 8080)
        url = sb.expose_port(8080)
    finally:
        sb.terminate()
        sb.close()
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((parts.hostname, parts.port), timeout=5)


def test_unexposed_port_unreachable_from_host(network_daemon: Any) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        start_greeter(sb, "0.0.0.0", 8081)
        address = sb.status().address
        # The host's output chain rejects new connections into the bridge.
        with pytest.raises(OSError):
            socket.create_connection((address, 8081), timeout=3)


def test_unexposed_port_unreachable_from_remote(
    network_daemon: Any, remote_host: Any
) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        start_greeter(sb, "0.0.0.0", 8082)
        address = sb.status().address
        remote_host.add_route(f"{address}/32")
        result = remote_host.run_inside(
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('{address}', 8082), timeout=3)\n"
            "    print('connected')\n"
            "except OSError as error:\n"
            "    print('failed', error)\n"
        )
    assert result.stdout.startswith("failed"), result.stdout + result.stderr


def test_exposed_port_without_listener(network_daemon: Any) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        parts = urlsplit(sb.expose_port(8099))
        assert parts.hostname is not None and parts.port is not None
        # The forwarder accepts, finds nothing listening inside and closes.
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as conn:
            assert conn.recv(16) == b""


@pytest.mark.parametrize("port", [0, 65536, 70000])
def test_expose_bad_port(network_daemon: Any, port: int) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        with pytest.raises(InvalidArgument, match=str(port)):
            sb.expose_port(port)
        assert sb.list_urls() == {}


def test_exposed_ports_capped(network_daemon: Any) -> None:
    with Sandbox(address=network_daemon.address, block_network=True).create() as sb:
        for port in range(20000, 20000 + MAX_EXPOSED_PORTS):
            sb.expose_port(port)
        with pytest.raises(ResourceExhausted, match=str(MAX_EXPOSED_PORTS)):
            sb.expose_port(30000)
        assert len(sb.list_urls()) == MAX_EXPOSED_PORTS
        # A port that is already exposed returns its URL again.
        assert sb.expose_port(20000) == sb.list_urls()[20000]
