"""What sandbox networking leaves on the host: links, addresses, routes, nftables.

Each test runs a private engine and lists its network objects before,
during and after: the bridge and veth links named after its data dir, the
IPv4 addresses and routes in its subnet, and its nftables table with the
table's chains and map elements. Other engines on the machine use
other names, so they do not disturb the comparison.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import make_data_dir, start_daemon
from pyroute2 import Conntrack

from engine import Sandbox
from engine.core.network import instance_names
from engine.errors import InvalidArgument
from engine.runtime import netlink
from engine.runtime.nftables import Nft

LISTENER = (
    "import socket, time; s = socket.create_server(('127.0.0.1', 8080)); time.sleep(60)"
)
# Accepts connections on 127.0.0.1:8080 and keeps them open.
ACCEPTER = (
    "import socket, time; s = socket.create_server(('127.0.0.1', 8080))\n"
    "held = []\n"
    "while True: held.append(s.accept())"
)


@dataclass(frozen=True)
class NetworkState:
    links: tuple[str, ...]
    addresses: tuple[str, ...]
    routes: tuple[str, ...]
    tables: tuple[str, ...]
    chains: tuple[str, ...]
    # Keys of the map "sandboxes": sandbox addresses.
    elements: tuple[str, ...]
    # Keys of the map "exposed": "URL address . URL port".
    exposed: tuple[str, ...] = ()


def network_state(data_dir: Path, subnet: str | None = None) -> NetworkState:
    bridge, veth_prefix, table = instance_names(data_dir)
    links = tuple(
        name
        for name in netlink.link_names()
        if name == bridge or name.startswith(veth_prefix)
    )
    network = ipaddress.IPv4Network(subnet) if subnet else None
    addresses = tuple(
        str(address)
        for address in netlink.ipv4_addresses()
        if network is not None and address.ip in network
    )
    routes = tuple(
        str(route)
        for route in netlink.ipv4_routes()
        if network is not None and route.overlaps(network)
    )
    nft = Nft()
    try:
        tables = tuple(name for name in nft.table_names("inet") if name == table)
        chains: tuple[str, ...] = ()
        keys: dict[str, tuple[str, ...]] = {}
        if tables:
            items = nft.list_json(f"list table inet {table}")
            chains = tuple(i["chain"]["name"] for i in items if "chain" in i)
            for item in items:
                if "map" in item:
                    keys[item["map"]["name"]] = tuple(
                        _element_key(element[0])
                        for element in item["map"].get("elem", [])
                    )
    finally:
        nft.close()
    return NetworkState(
        links,
        addresses,
        routes,
        tables,
        chains,
        keys.get("sandboxes", ()),
        keys.get("exposed", ()),
    )


def translated_into(subnet: str) -> list[str]:
    """Return "address:port" of each tracked connection translated into ``subnet``."""
    network = ipaddress.IPv4Network(subnet)
    with Conntrack() as conntrack:
        return [
            f"{entry.tuple_orig.daddr}:{entry.tuple_orig.dport}"
            for entry in conntrack.dump_entries()
            if entry.tuple_reply.saddr is not None
            and entry.tuple_orig.daddr is not None
            and ipaddress.ip_address(entry.tuple_reply.saddr) in network
            and ipaddress.ip_address(entry.tuple_orig.daddr) not in network
        ]


def _element_key(key: Any) -> str:
    # nft's JSON has a concatenated key as {"concat": [part, ...]}.
    if isinstance(key, dict) and "concat" in key:
        return " . ".join(str(part) for part in key["concat"])
    return str(key)


def engine_subnet(daemon: Any) -> str:
    found = re.findall(r"network: bridge \S+ on (\S+),", daemon.log())
    assert found, f"no network line in the daemon log:\n{daemon.log()}"
    return found[-1]


def veth_name(data_dir: Path, subnet: str, address: str) -> str:
    _, prefix, _ = instance_names(data_dir)
    number = int(ipaddress.IPv4Address(address)) - int(
        ipaddress.IPv4Network(subnet).network_address
    )
    return f"{prefix}{number:04x}"


def test_terminate_removes_sandbox_network(daemon_factory: Any) -> None:
    daemon = daemon_factory()
    subnet = engine_subnet(daemon)
    sb = Sandbox(address=daemon.address).create()
    sandbox_id = sb.sandbox_id
    address = sb.status().address
    own_veth = veth_name(daemon.data_dir, subnet, address)
    sb.process.exec("python3", "-c", LISTENER)
    url = urlsplit(sb.expose_port(8080))
    during = network_state(daemon.data_dir, subnet)
    assert own_veth in during.links
    assert sandbox_id in during.chains
    assert address in during.elements
    assert during.exposed == (f"{url.hostname} . {url.port}",)
    sb.terminate()
    sb.close()
    # Terminate returns once the sandbox's processes are gone; the engine
    # removes its network right after, in the background.
    deadline = time.monotonic() + 10
    after = network_state(daemon.data_dir, subnet)
    while own_veth in after.links and time.monotonic() < deadline:
        time.sleep(0.05)
        after = network_state(daemon.data_dir, subnet)
    assert own_veth not in after.links
    assert sandbox_id not in after.chains
    assert address not in after.elements
    assert after.exposed == ()
    # The bridge's own address and route stay while the daemon runs.
    assert after.addresses == during.addresses
    assert after.routes == during.routes


def test_daemon_stop_removes_everything(daemon_factory: Any) -> None:
    data_dir = make_data_dir()
    before = network_state(data_dir)
    assert before == NetworkState((), (), (), (), (), ())
    daemon = daemon_factory(data_dir=data_dir)
    subnet = engine_subnet(daemon)
    with Sandbox(address=daemon.address).create() as sb:
        sb.status()
    Sandbox(address=daemon.address, block_network=True).create().close()
    during = network_state(data_dir, subnet)
    bridge, _, table = instance_names(data_dir)
    assert bridge in during.links
    assert during.tables == (table,)
    assert len(during.addresses) == 1
    assert during.routes == (subnet,)
    assert daemon.stop() == 0
    assert network_state(data_dir, subnet) == before


def test_failed_create_leaves_no_chain(daemon_factory: Any) -> None:
    daemon = daemon_factory()
    subnet = engine_subnet(daemon)
    # Let the pool fill, so that its veths do not change between the snapshots.
    _wait_for_pool(daemon.data_dir)
    before = network_state(daemon.data_dir, subnet)
    with pytest.raises(InvalidArgument, match=re.escape("'10.1.2.3/40'")):
        Sandbox(address=daemon.address, allow_list=["10.1.2.3/40"]).create()
    # This one fails in the supervisor, after it took a networked slot.
    with pytest.raises(InvalidArgument, match="not a directory"):
        Sandbox(address=daemon.address, workdir="/etc/passwd/sub").create()
    after = network_state(daemon.data_dir, subnet)
    assert after.chains == before.chains
    assert after.elements == before.elements
    assert after.addresses == before.addresses
    # The failed sandbox took one pooled veth, and it is gone. The pool
    # refills only once it is half empty, so it made none in its place.
    assert set(after.links) <= set(before.links)
    assert len(before.links) - len(after.links) == 1


def _wait_for_pool(data_dir: Path, size: int = 8, timeout: float = 30) -> None:
    _, prefix, _ = instance_names(data_dir)
    deadline = time.monotonic() + timeout
    while len([n for n in netlink.link_names(prefix)]) < size:
        assert time.monotonic() < deadline, "the supervisor pool did not fill"
        time.sleep(0.1)
    time.sleep(0.5)


def test_restart_sweeps_crash_leftovers(daemon_factory: Any) -> None:
    # Not from daemon_factory, which expects every daemon to exit with 0.
    data_dir = make_data_dir()
    daemon = start_daemon(data_dir)
    subnet = engine_subnet(daemon)
    sb = Sandbox(address=daemon.address).create()
    try:
        sb.process.exec("python3", "-c", ACCEPTER)
        time.sleep(1)
        url = urlsplit(sb.expose_port(8080))
    finally:
        sb.close()
    assert url.hostname is not None and url.port is not None
    # Open through the kernel path, and still tracked after the crash.
    client = socket.create_connection((url.hostname, url.port), timeout=5)
    children = daemon.descendants()
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.process.wait()
    daemon.log_path.unlink()
    psutil.wait_procs(children, timeout=30)
    client.close()
    left = network_state(data_dir, subnet)
    _, _, table = instance_names(data_dir)
    assert left.tables == (table,)
    assert len(left.exposed) == 1
    assert translated_into(subnet)
    restarted = daemon_factory(data_dir=data_dir)
    log = restarted.log()
    assert f"removing leftover nftables table inet {table}" in log
    assert "removed leftover bridge" in log
    if engine_subnet(restarted) == subnet:
        assert "leftover conntrack entries of exposed ports" in log
        assert translated_into(subnet) == []
    new_subnet = engine_subnet(restarted)
    assert restarted.stop() == 0
    assert network_state(data_dir, subnet) == NetworkState((), (), (), (), (), ())
    assert network_state(data_dir, new_subnet) == NetworkState((), (), (), (), (), ())


def test_pool_discards_slot_without_veth(engine_factory: Any) -> None:
    runner = engine_factory()
    pool = runner.engine.pool
    assert pool is not None
    runner.wait_until(lambda: len(pool.ready[True]) >= 2, "two networked slots")
    broken = pool.ready[True][0]
    assert broken.attachment is not None
    broken_address = str(broken.attachment.address.ip)
    assert netlink.delete_link(broken.attachment.host_ifname)
    sandbox_id = runner.create()
    info = runner.call(runner.engine.get_sandbox(sandbox_id))
    assert info.address
    assert info.address != broken_address
    assert broken not in pool.slots()
    runner.wait_until(lambda: not runner.pid_alive(broken.pid), "the supervisor exit")
    runner.terminate(sandbox_id)
