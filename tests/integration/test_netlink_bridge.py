"""The engine's bridge keeps the MAC address it was created with.

A Linux bridge whose address was never set takes the lowest MAC of its ports.
Sandboxes cache the gateway's MAC, so a bridge whose MAC moved when another
sandbox's veth joined would stop receiving their packets.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from engine.runtime import netlink

# A universally administered MAC that sorts below every locally administered
# one, because those start at 02.
LOW_PORT_MAC = "00:00:5e:00:53:01"
# /sys/class/net/NAME/addr_assign_type of an address set through netlink.
NET_ADDR_SET = "3"


@pytest.fixture
def bridge_name() -> Iterator[str]:
    token = secrets.token_hex(4)
    name = f"tbr{token}"
    port = f"tpt{token}"
    try:
        yield name
    finally:
        netlink.delete_link(port)
        netlink.delete_link(name)


def test_bridge_mac_fixed_on_port_join(bridge_name: str) -> None:
    # An address in 198.18.0.0/15, the range the network tests use.
    address = ipaddress.IPv4Interface("198.19.255.253/30")
    index = netlink.create_bridge(bridge_name, address)
    sysfs = Path("/sys/class/net") / bridge_name
    before = (sysfs / "address").read_text().strip()
    assert (sysfs / "addr_assign_type").read_text().strip() == NET_ADDR_SET
    port = bridge_name.replace("tbr", "tpt")
    with IPRoute() as ipr:
        # Deleting one end of a veth pair deletes the other.
        ipr.link("add", ifname=port, kind="veth", peer=f"{port}p", address=LOW_PORT_MAC)
        ipr.link("set", ifname=port, master=index, state="up")
    assert (Path("/sys/class/net") / port / "master").resolve().name == bridge_name
    assert (sysfs / "address").read_text().strip() == before


def test_local_mac_bits() -> None:
    mac = netlink.local_mac()
    first = int(mac.split(":")[0], 16)
    assert len(mac.split(":")) == 6
    assert first & 0x01 == 0
    assert first & 0x02 == 0x02
