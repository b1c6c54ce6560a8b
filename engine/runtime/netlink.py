"""Links, addresses, routes and conntrack entries through pyroute2 (rtnetlink).

The Engine calls these functions in the host's network namespace to manage
its bridge and the host ends of the sandboxes' veth pairs. It calls
``configure_inside`` from a thread that joined a sandbox's network namespace
with setns, before any sandbox code runs there.
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
from pathlib import Path

from pyroute2 import Conntrack, IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

# The main routing table.
MAIN_TABLE = 254


def _error(error: NetlinkError, action: str) -> OSError:
    return OSError(error.code, f"{action} failed: {error.args[-1]}")


def link_index(ifname: str) -> int | None:
    """Return the index of link ``ifname`` in this namespace, or None."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def link_names(prefix: str = "") -> list[str]:
    """Return the names of this namespace's links that start with ``prefix``."""
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return sorted(name for name in names if name.startswith(prefix))


def ipv4_routes() -> list[ipaddress.IPv4Network]:
    """Return the destination of each IPv4 route of the main table but the default."""
    networks = []
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            length = route["dst_len"]
            destination = route.get_attr("RTA_DST")
            if length == 0 or destination is None:
                continue
            networks.append(
                ipaddress.IPv4Network(f"{destination}/{length}", strict=False)
            )
    return networks


def default_route_interfaces() -> list[str]:
    """Return the names of the interfaces that IPv4 default routes leave through."""
    names = []
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            index = route.get_attr("RTA_OIF")
            if route["dst_len"] != 0 or index is None:
                continue
            links = ipr.get_links(index)
            if links:
                names.append(links[0].get_attr("IFLA_IFNAME"))
    return sorted(set(names))


def ipv4_addresses() -> list[ipaddress.IPv4Interface]:
    """Return every IPv4 address of this namespace with its prefix."""
    with IPRoute() as ipr:
        return [
            ipaddress.IPv4Interface(
                f"{item.get_attr('IFA_ADDRESS')}/{item['prefixlen']}"
            )
            for item in ipr.get_addr(family=socket.AF_INET)
        ]


def local_mac() -> str:
    """Return a random unicast MAC address from the locally administered range."""
    octets = bytearray(secrets.token_bytes(6))
    # Bit 1 of the first octet set means locally administered, and bit 0 clear
    # means unicast.
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{octet:02x}" for octet in octets)


def create_bridge(name: str, address: ipaddress.IPv4Interface) -> int:
    """Create bridge ``name`` with ``address``, bring it up and return its index.

    Spanning tree stays off, so a new port forwards at once. The bridge gets
    no IPv6 address: IPv6 is disabled on it. Its MAC address is set when it
    is created: a bridge without one takes the lowest MAC of its ports, so
    it would change whenever a veth with a lower MAC joins, and sandboxes
    would keep sending to the gateway's old MAC, which no port owns.
    """
    with IPRoute() as ipr:
        try:
            ipr.link(
                "add",
                ifname=name,
                kind="bridge",
                br_stp_state=0,
                address=local_mac(),
            )
        except NetlinkError as error:
            raise _error(error, f"create bridge {name}") from error
        index = ipr.link_lookup(ifname=name)[0]
        try:
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")
            ipr.addr(
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
            )
            ipr.link("set", index=index, state="up")
        except NetlinkError as error:
            ipr.link("del", index=index)
            raise _error(error, f"configure bridge {name}") from error
        except OSError:
            ipr.link("del", index=index)
            raise
    return index


def enable_forwarding(ifname: str) -> None:
    """Let the kernel forward IPv4 packets that arrive on ``ifname``.

    Linux decides whether to forward an IPv4 packet by the forwarding flag of
    the interface it arrived on, so this leaves every other interface, and
    the host-wide net.ipv4.ip_forward, as they are.
    """
    _write_sysctl(f"/proc/sys/net/ipv4/conf/{ifname}/forwarding", "1")


def forwarding_enabled(ifname: str) -> bool:
    path = Path(f"/proc/sys/net/ipv4/conf/{ifname}/forwarding")
    try:
        return path.read_text().strip() == "1"
    except FileNotFoundError:
        return False


def _write_sysctl(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError as error:
        raise OSError(
            error.errno, f"write {value} to {path} failed: {error.strerror}"
        ) from error


def received_packets(ifname: str) -> int | None:
    """Return how many packets link ``ifname`` has received, or None if unknown.

    The count comes from sysfs, which shows the links of the network namespace
    that mounted it, so this reads the host's links.
    """
    try:
        text = Path(f"/sys/class/net/{ifname}/statistics/rx_packets").read_text()
        return int(text)
    except (OSError, ValueError):
        return None


def delete_link(ifname: str) -> bool:
    """Delete link ``ifname``; return False if it did not exist."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as error:
            if error.code == errno.ENODEV:
                return False
            raise _error(error, f"delete link {ifname}") from error
    return True


def create_veth(host_name: str, peer_name: str, netns_fd: int, bridge: int) -> int:
    """Create a veth pair whose peer is in the network namespace ``netns_fd``.

    The host end joins bridge index ``bridge`` as an isolated port: the kernel
    never forwards frames between two isolated ports, so sandboxes on one
    bridge cannot reach each other at layer 2. Returns the host end's index.
    """
    with IPRoute() as ipr:
        try:
            ipr.link(
                "add",
                ifname=host_name,
                kind="veth",
                peer={"ifname": peer_name, "net_ns_fd": netns_fd},
            )
        except NetlinkError as error:
            raise _error(error, f"create veth {host_name}") from error
        index = ipr.link_lookup(ifname=host_name)[0]
        try:
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{host_name}/disable_ipv6", "1")
            ipr.link("set", index=index, master=bridge)
            ipr.brport("set", index=index, isolated=1)
            ipr.link("set", index=index, state="up")
        except NetlinkError as error:
            ipr.link("del", index=index)
            raise _error(error, f"attach veth {host_name} to the bridge") from error
        except OSError:
            ipr.link("del", index=index)
            raise
    return index


def configure_inside(
    ifname: str, address: ipaddress.IPv4Interface, gateway: ipaddress.IPv4Address
) -> None:
    """Give ``ifname`` its address, bring it up and route through ``gateway``.

    Runs in the sandbox's network namespace, before any sandbox code.
    """
    # No IPv6 on the sandbox's interface: sandboxes have IPv4 only, and this
    # keeps the kernel from sending router and multicast listener messages.
    _write_sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "1")
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise OSError(errno.ENODEV, f"interface {ifname} not found in the sandbox")
        index = found[0]
        try:
            ipr.addr(
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
            )
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=index)
        except NetlinkError as error:
            raise _error(error, f"configure {ifname} with {address}") from error


def flush_conntrack(address: ipaddress.IPv4Address) -> int:
    """Delete every conntrack entry whose original source is ``address``.

    Packets of a deleted connection no longer match ``ct state established``,
    so a rule change applies to connections that were already open. Returns
    how many entries were deleted.
    """
    deleted = 0
    with Conntrack() as conntrack:
        match = NFCTAttrTuple(saddr=str(address))
        for entry in list(conntrack.dump_entries(tuple_orig=match)):
            try:
                conntrack.delete(entry)
            except NetlinkError as error:
                # The entry timed out between the dump and the delete.
                if error.code != errno.ENOENT:
                    raise _error(
                        error, f"delete conntrack entries of {address}"
                    ) from error
                continue
            deleted += 1
    return deleted
