"""Exposed ports: URLs on the host that reach a port inside a sandbox.

Both paths end at the sandbox's own 127.0.0.1, so exposing works for a
sandbox with blocked egress. Connections from the host to a networked
sandbox take the kernel path, which conntrack shows as translated to the
sandbox's address; those to a loopback-only sandbox go through the
forwarder. A port that is not exposed is unreachable from the host and from
the test's remote host namespace, and the kernel path opens no way in for
other hosts or other sandboxes.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
from test_network_egress import GATEWAY_PROBE, TCP_PROBE, probe

from engine import Sandbox, SandboxInstance
from engine.core.engine import MAX_EXPOSED_PORTS
from engine.core.network import Network, instance_names
from engine.errors import InvalidArgument, ResourceExhausted
from engine.runtime.nftables import Nft

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


def start_server(sb: SandboxInstance, code: str, *args: str) -> None:
    """Run Python ``code`` in ``sb`` and wait until it prints "listening"."""
    process = sb.process.exec("python3", "-c", code, *args)
    deadline = time.monotonic() + 10
    output = b""
    while b"listening" not in output:
        assert time.monotonic() < deadline, f"server did not start: {output!r}"
        output += process.stdout.read_available()
        time.sleep(0.05)


def start_greeter(sb: SandboxInstance, host: str, port: int) -> None:
    start_server(sb, GREETER, host, str(port), sb.sandbox_id)


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


@pytest.mark.parametrize("block_network", [False, True], ids=["kernel", "forwarder"])
def test_exposed_port_carries_dialogue(
    network_daemon: Any, block_network: bool
) -> None:
    sandbox = Sandbox(address=network_daemon.address, block_network=block_network)
    with sandbox.create() as sb:
        start_server(sb, ECHO)
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


def connect_from_remote(remote_host: Any, address: str, port: int) -> str:
    """Connect from the remote host to ``address:port``; return what the probe printed.

    That is "connected", or "failed" and the error.
    """
    remote_host.add_route(f"{address}/32")
    result = remote_host.run_inside(
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('{address}', {port}), timeout=3)\n"
        "    print('connected')\n"
        "except OSError as error:\n"
        "    print('failed', error)\n"
    )
    return result.stdout + result.stderr


def test_unexposed_port_unreachable_from_remote(
    network_daemon: Any, remote_host: Any
) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        start_greeter(sb, "0.0.0.0", 8082)
        result = connect_from_remote(remote_host, sb.status().address, 8082)
    assert result.startswith("failed"), result


def test_exposed_port_without_listener(network_daemon: Any) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        parts = urlsplit(sb.expose_port(8099))
        assert parts.hostname is not None and parts.port is not None
        # The sandbox's kernel replies to the translated SYN with a reset.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((parts.hostname, parts.port), timeout=5)


def test_forwarded_port_without_listener(network_daemon: Any) -> None:
    with Sandbox(address=network_daemon.address, block_network=True).create() as sb:
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


# Serves on (host, port) until killed. Sends each client its peer address as
# accept() returned it, then echoes what the client sends.
PEER_ECHO = """
import socket, sys, threading
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
def serve(client, peer):
    with client:
        client.sendall(peer[0].encode() + b"\\n")
        while data := client.recv(65536):
            client.sendall(data)
while True:
    client, peer = server.accept()
    threading.Thread(target=serve, args=(client, peer), daemon=True).start()
"""


def start_peer_echo(sb: SandboxInstance, host: str, port: int) -> None:
    start_server(sb, PEER_ECHO, host, str(port))


def connect(url: str) -> tuple[socket.socket, str]:
    """Connect to ``url``; return the socket and the peer address the server saw."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    conn = socket.create_connection((parts.hostname, parts.port), timeout=5)
    seen = b""
    while not seen.endswith(b"\n"):
        chunk = conn.recv(64)
        assert chunk, f"connection closed after {seen!r}"
        seen += chunk
    return conn, seen.decode().strip()


def exchange(conn: socket.socket, data: bytes) -> bytes:
    conn.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = conn.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def translated_to(url: str) -> list[str]:
    """Return the reply source address of each tracked connection to ``url``.

    A connection that the kernel translated to a sandbox has the sandbox's
    address there; one that the forwarder accepted has the URL's own address.
    """
    parts = urlsplit(url)
    match = NFCTAttrTuple(
        daddr=parts.hostname, proto=socket.IPPROTO_TCP, dport=parts.port
    )
    with Conntrack() as conntrack:
        return [
            entry.tuple_reply.saddr
            for entry in conntrack.dump_entries(tuple_orig=match)
        ]


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_kernel_path_reaches_loopback(network_daemon: Any, bind: str) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        start_peer_echo(sb, bind, 8080)
        url = sb.expose_port(8080)
        conn, peer = connect(url)
        with conn:
            assert translated_to(url) == [sb.status().address]
            # accept() inside returns a 127.0.0.1 peer, as through the forwarder.
            assert peer == "127.0.0.1"
            big = bytes(range(256)) * 8192
            assert exchange(conn, big) == big


def test_loopback_sandbox_uses_forwarder(network_daemon: Any) -> None:
    with Sandbox(address=network_daemon.address, block_network=True).create() as sb:
        start_peer_echo(sb, "127.0.0.1", 8080)
        url = sb.expose_port(8080)
        conn, peer = connect(url)
        with conn:
            assert translated_to(url) == ["127.0.0.1"]
            assert peer == "127.0.0.1"
            assert exchange(conn, b"ping") == b"ping"


def test_kernel_path_survives_egress_block(network_daemon: Any) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        start_peer_echo(sb, "127.0.0.1", 8080)
        url = sb.expose_port(8080)
        conn, _ = connect(url)
        with conn:
            assert exchange(conn, b"before") == b"before"
            sb.update_network_permissions(block_network=True)
            # The update deletes the sandbox's own conntrack entries, not
            # those of connections the host opened into it.
            assert exchange(conn, b"after") == b"after"
            assert translated_to(url) == [sb.status().address]
        fresh, _ = connect(url)
        with fresh:
            assert exchange(fresh, b"fresh") == b"fresh"


def test_terminate_cuts_kernel_path(network_daemon: Any) -> None:
    sb = Sandbox(address=network_daemon.address).create()
    try:
        start_peer_echo(sb, "127.0.0.1", 8080)
        url = sb.expose_port(8080)
        conn, _ = connect(url)
        assert exchange(conn, b"ping") == b"ping"
    finally:
        sb.terminate()
        sb.close()
    with conn:
        conn.settimeout(5)
        try:
            ended = conn.recv(16)
        except ConnectionResetError:
            ended = b""
        assert ended == b""
    assert translated_to(url) == []
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((parts.hostname, parts.port), timeout=5)


def test_exposed_port_only_through_url(network_daemon: Any, remote_host: Any) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        start_greeter(sb, "0.0.0.0", 8080)
        sb.expose_port(8080)
        address = sb.status().address
        # The output chain admits only connections that the URL's rule
        # translated, not one the host opens to the port itself.
        with pytest.raises(OSError):
            socket.create_connection((address, 8080), timeout=3)
        result = connect_from_remote(remote_host, address, 8080)
    assert result.startswith("failed"), result


def test_sandbox_cannot_use_other_url(network_daemon: Any) -> None:
    with (
        Sandbox(address=network_daemon.address).create() as server,
        Sandbox(address=network_daemon.address).create() as client,
    ):
        start_greeter(server, "0.0.0.0", 8080)
        url_port = str(urlsplit(server.expose_port(8080)).port)
        gateway = probe(client, GATEWAY_PROBE)["gateway"]
        # The URL's port on the gateway: the input chain rejects it, and only
        # the host's output hook translates the URL.
        assert probe(client, TCP_PROBE, gateway, url_port) == {
            "errno": errno.ECONNREFUSED
        }
        assert "errno" in probe(client, TCP_PROBE, server.status().address, "8080")


def test_ruleset_guards_route_localnet(network_daemon: Any) -> None:
    bridge, _, table = instance_names(network_daemon.data_dir)
    nft = Nft()
    try:
        martians = nft.run(f"list chain inet {table} martians")
        input_chain = nft.run(f"list chain inet {table} input")
    finally:
        nft.close()
    assert f'iifname "{bridge}" ip saddr 127.0.0.0/8 drop' in martians
    assert f'iifname "{bridge}" ip daddr 127.0.0.0/8 drop' in martians
    assert "hook prerouting priority raw" in martians
    lines = [line.strip() for line in input_chain.splitlines()]
    accept = f'iifname "{bridge}" ct direction reply ct status dnat accept'
    reject = f'iifname "{bridge}" meta l4proto tcp reject with tcp reset'
    assert lines.index(accept) < lines.index(reject)
    route_localnet = f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet"
    with open(route_localnet) as flag:
        assert flag.read().strip() == "1"


def test_kernel_path_failure_falls_back(
    engine: Any,
    new_sandbox: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "injected failure")

    monkeypatch.setattr(Network, "expose", fail)
    sandbox_id = new_sandbox()
    url = engine.call(engine.engine.expose_port(sandbox_id, 8099))
    assert "kernel path not set up" in caplog.text
    assert "injected failure" in caplog.text
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    # Nothing listens inside: the forwarder accepts and closes, where the
    # kernel path would have refused.
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as conn:
        assert conn.recv(16) == b""
