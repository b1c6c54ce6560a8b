"""Sandbox egress against a test-owned remote host: allowed, blocked, allow-listed.

Every packet of these tests goes to the remote host's namespace (see
netpeer.py), to another sandbox or to an address of this host. The daemon's
only uplink is the host end of the remote host's veth, and its DNS server is
the remote host's responder, so a leak would show up in the remote host's log
or reach nothing. The link-local and metadata blocks are checked in the
nftables ruleset, never with a packet.
"""

from __future__ import annotations

import errno
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
from test_network_cleanup import engine_subnet, veth_name

from engine import Sandbox, SandboxInstance
from engine.core.network import instance_names
from engine.errors import FailedPrecondition, InvalidArgument
from engine.runtime import netlink
from engine.runtime.nftables import Nft

TCP_PROBE = """
import json, socket, sys
sock = socket.socket()
sock.settimeout(5)
try:
    sock.connect((sys.argv[1], int(sys.argv[2])))
    sock.sendall(b"ping")
    print(json.dumps({"reply": sock.recv(16).decode()}))
except OSError as error:
    print(json.dumps({"errno": error.errno}))
"""

UDP_PROBE = """
import json, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(3)
try:
    sock.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
    print(json.dumps({"reply": sock.recv(16).decode()}))
except OSError as error:
    print(json.dumps({"errno": error.errno}))
"""

DNS_PROBE = """
import json, socket
try:
    print(json.dumps({"address": socket.gethostbyname("remote.test")}))
except OSError as error:
    print(json.dumps({"error": str(error)}))
"""

GATEWAY_PROBE = """
import json, socket, struct
rows = [line.split() for line in open("/proc/net/route").read().splitlines()[1:]]
gateway = [row[2] for row in rows if row[1] == "00000000"][0]
print(json.dumps({"gateway": socket.inet_ntoa(struct.pack("<I", int(gateway, 16)))}))
"""

# Holds one connection open: prints each reply, reads a line of stdin per send.
HELD_CONNECTION = """
import socket, sys
sock = socket.socket()
sock.settimeout(3)
sock.connect((sys.argv[1], int(sys.argv[2])))
for line in sys.stdin:
    try:
        sock.sendall(line.encode())
        print("reply", sock.recv(64).decode().strip(), flush=True)
    except OSError as error:
        print("error", error.errno, flush=True)
"""


def probe(sb: SandboxInstance, code: str, *args: str) -> dict[str, Any]:
    process = sb.process.exec("python3", "-c", code, *args, timeout=30)
    process.wait()
    output = process.stdout.read()
    assert output, process.stderr.read()
    return json.loads(output)


@pytest.fixture
def open_sandbox(network_daemon: Any) -> Iterator[SandboxInstance]:
    with Sandbox(address=network_daemon.address).create() as sb:
        yield sb


@pytest.fixture
def blocked_sandbox(network_daemon: Any) -> Iterator[SandboxInstance]:
    with Sandbox(address=network_daemon.address, block_network=True).create() as sb:
        yield sb


def test_egress_tcp_reaches_remote(
    open_sandbox: SandboxInstance, remote_host: Any
) -> None:
    before = len(remote_host.events("tcp"))
    result = probe(open_sandbox, TCP_PROBE, remote_host.address, "7000")
    assert result == {"reply": "ping"}
    sources = [event["source"] for event in remote_host.events("tcp")[before:]]
    # Masqueraded to the address of the interface the packet left through.
    assert sources == [remote_host.host_address]


def test_egress_udp_reaches_remote(
    open_sandbox: SandboxInstance, remote_host: Any
) -> None:
    result = probe(open_sandbox, UDP_PROBE, remote_host.address, "7001")
    assert result == {"reply": "ping"}


def test_dns_uses_configured_server(
    open_sandbox: SandboxInstance, remote_host: Any
) -> None:
    resolv = open_sandbox.fs.read_text("/etc/resolv.conf")
    assert resolv == f"nameserver {remote_host.address}\n"
    result = probe(open_sandbox, DNS_PROBE)
    assert result == {"address": remote_host.address}
    names = [event["name"] for event in remote_host.events("dns")]
    assert "remote.test" in names


def test_sandbox_has_address_and_route(open_sandbox: SandboxInstance) -> None:
    info = open_sandbox.status()
    assert info.address
    result = open_sandbox.process.run_code(
        "import socket; print([n for _, n in socket.if_nameindex()])"
    )
    assert result.stdout.strip() == "['lo', 'eth0']"
    hosts = open_sandbox.fs.read_text("/etc/hosts")
    assert f"{info.address}\t{open_sandbox.sandbox_id}" in hosts
    route = open_sandbox.process.run_code("print(open('/proc/net/route').read())")
    # The default route (destination 00000000) leaves through eth0.
    assert any(
        line.split()[:2] == ["eth0", "00000000"] for line in route.stdout.splitlines()
    )


def test_block_network_leaves_loopback(
    blocked_sandbox: SandboxInstance, remote_host: Any
) -> None:
    info = blocked_sandbox.status()
    assert info.spec.block_network is True
    assert info.address == ""
    names = blocked_sandbox.process.run_code(
        "import socket; print([n for _, n in socket.if_nameindex()])"
    )
    assert names.stdout.strip() == "['lo']"
    before = len(remote_host.events())
    result = probe(blocked_sandbox, TCP_PROBE, remote_host.address, "7000")
    assert result == {"errno": errno.ENETUNREACH}
    udp = probe(blocked_sandbox, UDP_PROBE, remote_host.address, "7001")
    assert udp == {"errno": errno.ENETUNREACH}
    assert remote_host.events()[before:] == []


def test_block_network_blocks_dns(
    blocked_sandbox: SandboxInstance, remote_host: Any
) -> None:
    before = len(remote_host.events("dns"))
    resolv = blocked_sandbox.fs.read_text("/etc/resolv.conf")
    assert "nameserver" not in resolv
    result = probe(blocked_sandbox, DNS_PROBE)
    assert "error" in result
    assert remote_host.events("dns")[before:] == []


def test_allow_list_admits_listed(network_daemon: Any, remote_host: Any) -> None:
    with Sandbox(
        address=network_daemon.address, allow_list=[f"{remote_host.address}/32"]
    ).create() as sb:
        assert sb.status().spec.allow_list == (f"{remote_host.address}/32",)
        result = probe(sb, TCP_PROBE, remote_host.address, "7000")
    assert result == {"reply": "ping"}


def test_allow_list_rejects_unlisted(network_daemon: Any, remote_host: Any) -> None:
    # 192.0.2.0/24 (TEST-NET-1) is listed; the remote host is not.
    with Sandbox(
        address=network_daemon.address, allow_list=["192.0.2.0/24"]
    ).create() as sb:
        before = len(remote_host.events())
        tcp = probe(sb, TCP_PROBE, remote_host.address, "7000")
        udp = probe(sb, UDP_PROBE, remote_host.address, "7001")
        dns = probe(sb, DNS_PROBE)
    assert tcp == {"errno": errno.ECONNREFUSED}
    assert "errno" in udp
    assert "error" in dns
    assert remote_host.events()[before:] == []


def test_both_options_invalid(network_daemon: Any) -> None:
    with pytest.raises(InvalidArgument, match="block_network and allow_list"):
        Sandbox(
            address=network_daemon.address,
            block_network=True,
            allow_list=["198.51.100.0/24"],
        ).create()


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "not-a-cidr", "2001:db8::/32"])
def test_bad_cidr_names_value(network_daemon: Any, entry: str) -> None:
    with pytest.raises(InvalidArgument, match=repr(entry).replace("[", r"\[")):
        Sandbox(address=network_daemon.address, allow_list=[entry]).create()


def test_sandboxes_cannot_reach_each_other(network_daemon: Any) -> None:
    with (
        Sandbox(address=network_daemon.address).create() as server,
        Sandbox(address=network_daemon.address).create() as client,
    ):
        listener = server.process.exec(
            "python3",
            "-c",
            "import socket; s = socket.create_server(('0.0.0.0', 8000));"
            " print('listening', flush=True); c, _ = s.accept(); print('accepted')",
        )
        _wait_for_line(listener, "listening")
        address = server.status().address
        result = probe(client, TCP_PROBE, address, "8000")
        assert "errno" in result
        assert listener.status().exit_code is None


def test_sandbox_cannot_reach_host(
    open_sandbox: SandboxInstance, network_daemon: Any, remote_host: Any
) -> None:
    from netpeer import host_listener

    gateway = probe(open_sandbox, GATEWAY_PROBE)["gateway"]
    with (
        host_listener("0.0.0.0") as any_address,
        host_listener(remote_host.host_address) as on_uplink,
    ):
        port_any = any_address.getsockname()[1]
        port_uplink = on_uplink.getsockname()[1]
        on_gateway = probe(open_sandbox, TCP_PROBE, gateway, str(port_any))
        on_host_address = probe(
            open_sandbox, TCP_PROBE, remote_host.host_address, str(port_uplink)
        )
        with pytest.raises(BlockingIOError):
            any_address.accept()
        with pytest.raises(BlockingIOError):
            on_uplink.accept()
    assert "errno" in on_gateway
    assert "errno" in on_host_address
    # The daemon's own TCP listener is on the host end of the uplink.
    daemon_port = _daemon_tcp_port(network_daemon, remote_host.host_address)
    to_daemon = probe(
        open_sandbox, TCP_PROBE, remote_host.host_address, str(daemon_port)
    )
    assert "errno" in to_daemon


def _daemon_tcp_port(daemon: Any, host: str) -> int:
    found = re.search(rf"serving on .*{re.escape(host)}:(\d+)", daemon.log())
    assert found, f"no TCP address in the daemon log:\n{daemon.log()}"
    return int(found.group(1))


def test_ruleset_blocks_metadata_and_link_local(network_daemon: Any) -> None:
    _, _, table = instance_names(network_daemon.data_dir)
    nft = Nft()
    try:
        text = nft.run(f"list chain inet {table} egress")
    finally:
        nft.close()
    lines = [line.strip() for line in text.splitlines()]
    blocked = next(line for line in lines if line.startswith("ip daddr {"))
    assert "169.254.0.0/16" in blocked
    assert "100.100.100.200" in blocked
    assert blocked.endswith("drop")
    # The block comes before any sandbox's own chain, so no allow-list opens it.
    assert lines.index(blocked) < lines.index("ip saddr vmap @sandboxes")
    assert "meta nfproto ipv6 drop" in lines


def test_update_cuts_open_connection(network_daemon: Any, remote_host: Any) -> None:
    with Sandbox(address=network_daemon.address).create() as sb:
        held = sb.process.exec(
            "python3", "-c", HELD_CONNECTION, remote_host.address, "7000", stdin=True
        )
        held.stdin.write("one\n")
        _wait_for_line(held, "reply one")
        info = sb.update_network_permissions(allow_list=["192.0.2.0/24"])
        assert info.spec.allow_list == ("192.0.2.0/24",)
        held.stdin.write("two\n")
        line = _wait_for_line(held, "error")
        assert line.startswith("error")
        fresh = probe(sb, TCP_PROBE, remote_host.address, "7000")
        assert fresh == {"errno": errno.ECONNREFUSED}
        sb.update_network_permissions()
        reopened = probe(sb, TCP_PROBE, remote_host.address, "7000")
        assert reopened == {"reply": "ping"}
        sb.update_network_permissions(block_network=True)
        blocked = probe(sb, TCP_PROBE, remote_host.address, "7000")
        assert blocked == {"errno": errno.ECONNREFUSED}
        held.stdin.close()


def test_update_blocked_sandbox_fails(blocked_sandbox: SandboxInstance) -> None:
    with pytest.raises(FailedPrecondition, match="no interface but loopback"):
        blocked_sandbox.update_network_permissions(allow_list=["192.0.2.0/24"])
    with pytest.raises(InvalidArgument, match="'bad'"):
        blocked_sandbox.update_network_permissions(allow_list=["bad"])


def _wait_for_line(process: Any, prefix: str, timeout: float = 15) -> str:
    """Return the next stdout line of ``process`` that starts with ``prefix``."""
    lines = _unread.setdefault(id(process), [])
    deadline = time.monotonic() + timeout
    while True:
        while lines:
            line = lines.pop(0)
            if line.startswith(prefix):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no stdout line starting with {prefix!r}")
        lines.extend(process.stdout.read_available().decode().splitlines())
        time.sleep(0.05)


# Lines read from a process's stdout but not yet returned, by id(process).
_unread: dict[int, list[str]] = {}


def _tracked_from(address: str) -> int:
    """Return how many host conntrack entries have ``address`` as original source."""
    with Conntrack() as conntrack:
        return len(
            list(conntrack.dump_entries(tuple_orig=NFCTAttrTuple(saddr=address)))
        )


def _wait_untracked(address: str, timeout: float = 10.0) -> bool:
    """Return whether no entry from ``address`` is left within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while _tracked_from(address) != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_terminate_flushes_sandbox_conntrack(
    network_daemon: Any, remote_host: Any
) -> None:
    sb = Sandbox(address=network_daemon.address).create()
    try:
        address = sb.status().address
        connection_process = sb.process.exec(
            "python3", "-c", HELD_CONNECTION, remote_host.address, "7000", stdin=True
        )
        connection_process.stdin.write("one\n")
        _wait_for_line(connection_process, "reply one")
        assert _tracked_from(address) == 1
    finally:
        sb.terminate()
        sb.close()
    # Terminate returns before the engine frees the network in the background.
    assert _wait_untracked(address)


def test_host_veth_counts_sandbox_packets(
    network_daemon: Any, remote_host: Any
) -> None:
    # Terminate skips the conntrack flush for a sandbox whose host veth end
    # received no packet, so that count must start at 0 and see traffic.
    with Sandbox(address=network_daemon.address).create() as sb:
        subnet = engine_subnet(network_daemon)
        host_end = veth_name(network_daemon.data_dir, subnet, sb.status().address)
        assert netlink.received_packets(host_end) == 0
        assert sb.process.run("true").exit_code == 0
        assert netlink.received_packets(host_end) == 0
        result = probe(sb, UDP_PROBE, remote_host.address, "7001")
        assert result == {"reply": "ping"}
        received = netlink.received_packets(host_end)
        assert received is not None
        assert received >= 1
