"""Sandbox networking: the engine's bridge, subnet, nftables table and policies.

Each Engine owns, under names derived from its data dir like its cgroup root:

- bridge ``eng-<hash>`` with the subnet's first address, the gateway, and
  IPv4 forwarding enabled on that interface only;
- one veth pair per networked sandbox: the host end ``ev<hash><n>`` is an
  isolated port of the bridge, and the other end is ``eth0`` in the sandbox;
- nftables table ``inet engine-<hash>``, with one chain ``sb-...`` per
  sandbox, reached through the verdict map ``sandboxes`` by source address.

The base chains of the table drop, whatever a sandbox's policy:

- forward: packets from the bridge back into the bridge (sandbox to
  sandbox), and IPv6. Also packets to link-local, metadata, multicast and
  broadcast destinations, packets that would leave through an interface
  outside ``Config.uplinks``, and packets from an address with no sandbox
  chain. New connections into the bridge from anywhere are dropped too;
- input: every packet from the bridge to any of the host's own addresses,
  except replies to connections the host opened;
- output: new connections from the host into the bridge, except those that
  the chain ``expose`` translated to an exposed port;
- prerouting (chain ``martians``): packets from the bridge with a source or
  destination in 127.0.0.0/8.

Sandbox egress is masqueraded to the address of the outgoing interface.

Connections from the host itself to an exposed port's URL are translated by
the kernel (``Network.expose``): the chain ``expose`` rewrites the URL's
address and port to the sandbox's address and port through the map
``exposed``, and the source to the gateway. Inside the sandbox, the table
``ip engine-ports`` rewrites them once more to 127.0.0.1, with
``route_localnet`` on ``eth0``, so services that listen on the sandbox's
loopback are reachable. The bridge has ``route_localnet`` too, because a
client on 127.0.0.1 keeps that source until postrouting.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import Conntrack
from pyroute2.conntrack import ConntrackEntry
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from engine.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from engine.runtime import libc, netlink
from engine.runtime.nftables import Nft

log = logging.getLogger(__name__)

# Destinations no sandbox reaches, whatever its allow-list. 169.254.0.0/16
# contains the metadata services of AWS, GCP and Azure (169.254.169.254) and
# 100.100.100.200 is Alibaba Cloud's; 0.0.0.0/8 and 127.0.0.0/8 are never
# valid destinations on the wire.
BLOCKED_DESTINATIONS = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "100.100.100.200",
    "224.0.0.0/4",
    "255.255.255.255",
)
# Range of the /16 that the engine picks when Config.subnet is unset.
AUTO_SUBNET_RANGE = ipaddress.IPv4Network("10.0.0.0/8")
AUTO_PREFIX = 16
# Held while an engine picks a subnet and creates its bridge, so two engines
# starting at once never pick the same one.
SUBNET_LOCK = Path("/run/engine-network.lock")
# Config.uplinks entry that means the interfaces of the host's IPv4
# default routes, resolved when the engine starts.
AUTO_UPLINKS = "auto"
# The interface name of every networked sandbox.
SANDBOX_IFNAME = "eth0"
# The nftables table (family ip) inside each sandbox's network namespace
# that rewrites exposed-port connections to the sandbox's 127.0.0.1.
INSIDE_TABLE_NAME = "engine-ports"
CLONE_NEWNET = 0x40000000
# Hook priorities of the nat and raw chains, as numbers: libnftables 1.0.6
# (Debian 12) accepts no "dstnat" keyword in an output hook.
PRIORITY_RAW = -300
PRIORITY_DSTNAT = -100
PRIORITY_SRCNAT = 100


@dataclass(frozen=True)
class NetworkPolicy:
    """Egress of one sandbox: none, only to ``allow_list``, or everywhere."""

    block: bool = False
    allow_list: tuple[str, ...] = ()


@dataclass(frozen=True)
class Attachment:
    """A veth pair prepared for one supervisor, with the sandbox's address."""

    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    host_ifname: str


def parse_allow_list(entries: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Return the allow-list's CIDRs in normal form, or raise InvalidArgument."""
    cidrs = []
    for entry in entries:
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise InvalidArgument(
                f"allow_list entry {entry!r} is not a valid CIDR; "
                "use a form such as 198.51.100.0/24 or 203.0.113.7"
            ) from None
        if network.version != 4:
            raise InvalidArgument(
                f"allow_list entry {entry!r} is an IPv6 network; sandboxes have "
                "IPv4 only, so pass IPv4 CIDRs"
            )
        cidrs.append(str(network))
    return tuple(dict.fromkeys(cidrs))


def check_policy(block: bool, allow_list: tuple[str, ...]) -> NetworkPolicy:
    """Return the policy for these options, or raise InvalidArgument."""
    cidrs = parse_allow_list(allow_list)
    if block and cidrs:
        raise InvalidArgument(
            "block_network and allow_list were both given; pass block_network "
            "for no egress or allow_list for egress to those CIDRs only"
        )
    return NetworkPolicy(block=block, allow_list=cidrs)


def instance_names(data_dir: Path) -> tuple[str, str, str]:
    """Return the bridge, veth prefix and nft table names for ``data_dir``."""
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]
    return f"eng-{digest}", f"ev{digest}", f"engine-{digest}"


class Network:
    """The networking of one Engine; every method blocks, so call it in an executor."""

    def __init__(
        self,
        data_dir: Path,
        *,
        subnet: str | None = None,
        dns_servers: tuple[str, ...] = (),
        uplinks: tuple[str, ...] = (),
    ) -> None:
        self.bridge, self.veth_prefix, self.table = instance_names(data_dir)
        self.requested_subnet = subnet
        self.dns_servers = dns_servers
        self.uplinks = uplinks
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway: ipaddress.IPv4Address | None = None
        self.nft: Nft | None = None
        # Host numbers in use. attach and detach run in executor threads, so
        # the lock guards these two fields.
        self._used: set[int] = set()
        self._next = 0
        # Exposed ports with a kernel path: (URL address, URL port) -> the
        # sandbox's address. Guarded by the lock as well.
        self._exposed: dict[tuple[str, int], ipaddress.IPv4Address] = {}
        self._lock = threading.Lock()

    # Lifecycle.

    def validate(self) -> None:
        """Raise InvalidArgument for a bad DNS server, subnet or uplink setting.

        It changes nothing, so the Engine calls it before it touches the host.
        """
        if self.requested_subnet is not None:
            self._requested_network()
        for server in self.dns_servers:
            try:
                ipaddress.IPv4Address(server)
            except ValueError:
                raise InvalidArgument(
                    f"DNS server {server!r} is not an IPv4 address; "
                    "pass one such as 192.0.2.53"
                ) from None
        if AUTO_UPLINKS in self.uplinks:
            found = netlink.default_route_interfaces()
            if not found:
                raise InvalidArgument(
                    f"uplink {AUTO_UPLINKS!r}: the host has no IPv4 default route; "
                    "name the uplink interfaces instead"
                )
            named = [name for name in self.uplinks if name != AUTO_UPLINKS]
            self.uplinks = tuple(dict.fromkeys([*named, *found]))
        for uplink in self.uplinks:
            if netlink.link_index(uplink) is None:
                raise InvalidArgument(
                    f"uplink interface {uplink!r} does not exist; "
                    "pass the name of a host interface"
                )

    def start(self) -> None:
        """Remove what a crashed engine left, then create the bridge and the table."""
        self.validate()
        self.nft = Nft()
        self.sweep(leftovers=True)
        for uplink in self.uplinks:
            if not netlink.forwarding_enabled(uplink):
                log.warning(
                    "replies that arrive on uplink %s are not forwarded to "
                    "sandboxes until net.ipv4.conf.%s.forwarding is 1",
                    uplink,
                    uplink,
                )
        with _host_lock():
            self.subnet = self._choose_subnet()
            self.gateway = next(self.subnet.hosts())
            gateway = ipaddress.IPv4Interface(f"{self.gateway}/{self.subnet.prefixlen}")
            netlink.create_bridge(self.bridge, gateway)
        try:
            removed = _flush_translated_conntrack(self.subnet)
            if removed:
                log.warning(
                    "removed %d leftover conntrack entries of exposed ports into %s",
                    removed,
                    self.subnet,
                )
            netlink.enable_forwarding(self.bridge)
            # A client on the host's 127.0.0.1 keeps that source address when
            # the chain ``expose`` sends its packets to the bridge, and Linux
            # routes such packets only with route_localnet on the interface.
            _enable_route_localnet(self.bridge)
            self.nft.run(self._table_batch())
        except BaseException:
            netlink.delete_link(self.bridge)
            raise
        log.info(
            "network: bridge %s on %s, nftables table inet %s, uplinks %s",
            self.bridge,
            self.subnet,
            self.table,
            ", ".join(self.uplinks) or "none",
        )

    def sweep(self, *, leftovers: bool = False) -> None:
        """Delete this engine's table, bridge and veths if they exist.

        With ``leftovers`` each one found is logged as left by a crash.
        """
        assert self.nft is not None
        report = log.warning if leftovers else log.debug
        if self.table in self.nft.table_names("inet"):
            report("removing leftover nftables table inet %s", self.table)
            self.nft.run(f"delete table inet {self.table}")
        for name in netlink.link_names(self.veth_prefix):
            report("removing leftover veth %s", name)
            netlink.delete_link(name)
        if netlink.delete_link(self.bridge):
            report("removed leftover bridge %s", self.bridge)

    def close(self) -> None:
        """Delete the table and the bridge; sandboxes must be detached first."""
        if self.nft is None:
            return
        with contextlib.suppress(OSError):
            self.sweep()
        self.nft.close()
        self.nft = None

    def _choose_subnet(self) -> ipaddress.IPv4Network:
        taken = netlink.ipv4_routes() + [a.network for a in netlink.ipv4_addresses()]
        if self.requested_subnet is not None:
            subnet = self._requested_network()
            clash = [route for route in taken if route.overlaps(subnet)]
            if clash:
                raise FailedPrecondition(
                    f"network subnet {subnet} overlaps the host's route to "
                    f"{clash[0]}; choose another subnet"
                )
            return subnet
        candidates = list(AUTO_SUBNET_RANGE.subnets(new_prefix=AUTO_PREFIX))
        start = int(self.table[-8:], 16) % len(candidates)
        for offset in range(len(candidates)):
            subnet = candidates[(start + offset) % len(candidates)]
            if not any(route.overlaps(subnet) for route in taken):
                return subnet
        raise ResourceExhausted(
            f"every /{AUTO_PREFIX} in {AUTO_SUBNET_RANGE} overlaps a host route; "
            "pass a subnet with --subnet"
        )

    def _requested_network(self) -> ipaddress.IPv4Network:
        assert self.requested_subnet is not None
        try:
            subnet = ipaddress.IPv4Network(self.requested_subnet, strict=True)
        except ValueError as error:
            raise InvalidArgument(
                f"network subnet {self.requested_subnet!r} is invalid: {error}; "
                "pass a network address such as 10.213.0.0/16"
            ) from None
        # A /12 has host numbers of at most 5 hex digits, which keeps veth
        # names within the kernel's 15 characters.
        if not 12 <= subnet.prefixlen <= 29:
            raise InvalidArgument(
                f"network subnet {subnet} has an unsupported size; "
                "use a prefix from /12 to /29"
            )
        return subnet

    def _table_batch(self) -> str:
        table = f"inet {self.table}"
        bridge = f'"{self.bridge}"'
        blocked = ", ".join(BLOCKED_DESTINATIONS)
        replies = "established,related"
        if self.uplinks:
            uplinks = ", ".join(f'"{name}"' for name in self.uplinks)
            uplink_rule = f"add rule {table} egress oifname != {{ {uplinks} }} drop"
        else:
            uplink_rule = f"add rule {table} egress drop"
        lines = [
            f"add table {table}",
            f"add map {table} sandboxes {{ type ipv4_addr : verdict; }}",
            f"add chain {table} forward "
            "{ type filter hook forward priority filter; policy accept; }",
            f"add chain {table} egress",
            f"add chain {table} input "
            "{ type filter hook input priority filter; policy accept; }",
            f"add chain {table} output "
            "{ type filter hook output priority filter; policy accept; }",
            f"add chain {table} postrouting "
            "{ type nat hook postrouting priority srcnat; policy accept; }",
            f"add rule {table} forward iifname {bridge} jump egress",
            f"add rule {table} forward oifname {bridge} ct state {replies} accept",
            f"add rule {table} forward oifname {bridge} drop",
            f"add rule {table} egress oifname {bridge} drop",
            f"add rule {table} egress meta nfproto ipv6 drop",
            f"add rule {table} egress ip daddr {{ {blocked} }} drop",
            uplink_rule,
            f"add rule {table} egress ip saddr vmap @sandboxes",
            f"add rule {table} egress drop",
            # Replies from a sandbox to a client of an exposed port. Of the
            # engine's rules, only the chain expose sets the DNAT status on
            # connections into the bridge, and sandbox code cannot open a
            # connection in the reply direction.
            f"add rule {table} input iifname {bridge} ct direction reply "
            "ct status dnat accept",
            f"add rule {table} input iifname {bridge} meta l4proto tcp "
            "reject with tcp reset",
            f"add rule {table} input iifname {bridge} "
            "reject with icmpx admin-prohibited",
            f"add rule {table} output oifname {bridge} ct state {replies} accept",
            f"add rule {table} output oifname {bridge} ct status dnat accept",
            f"add rule {table} output oifname {bridge} drop",
            f"add rule {table} postrouting iifname {bridge} oifname != {bridge} "
            "masquerade",
            *self._expose_batch(),
        ]
        return "\n".join(lines) + "\n"

    def _expose_batch(self) -> list[str]:
        """Return the map, chains and rules of the kernel path of exposed ports."""
        table = f"inet {self.table}"
        bridge = f'"{self.bridge}"'
        return [
            # (URL address . URL port) : (sandbox address . port inside).
            f"add map {table} exposed "
            "{ type ipv4_addr . inet_service : ipv4_addr . inet_service; }",
            f"add chain {table} expose "
            f"{{ type nat hook output priority {PRIORITY_DSTNAT}; policy accept; }}",
            f"add rule {table} expose meta l4proto tcp "
            "dnat ip to ip daddr . tcp dport map @exposed",
            # The sandbox replies to the gateway, so its replies come back to
            # the host's input chain whatever its egress policy.
            f"add rule {table} postrouting oifname {bridge} ct status dnat "
            f"snat ip to {self.gateway}",
            # Linux drops packets to or from 127.0.0.0/8 on an interface
            # without route_localnet. The bridge has it, so these rules drop
            # such packets from a sandbox.
            f"add chain {table} martians "
            f"{{ type filter hook prerouting priority {PRIORITY_RAW}; "
            "policy accept; }",
            f"add rule {table} martians iifname {bridge} ip saddr 127.0.0.0/8 drop",
            f"add rule {table} martians iifname {bridge} ip daddr 127.0.0.0/8 drop",
        ]

    # Addresses and veth pairs.

    def _allocate(self) -> ipaddress.IPv4Interface:
        assert self.subnet is not None
        # Host numbers 1 (the gateway) .. broadcast - 1, handed out in turn so
        # that a released address is reused as late as possible.
        last = self.subnet.num_addresses - 2
        with self._lock:
            for _ in range(last):
                self._next = self._next % last + 1
                if self._next != 1 and self._next not in self._used:
                    self._used.add(self._next)
                    address = self.subnet.network_address + self._next
                    prefix = self.subnet.prefixlen
                    return ipaddress.IPv4Interface(f"{address}/{prefix}")
        raise ResourceExhausted(
            f"every address of the sandbox subnet {self.subnet} is in use; "
            "terminate sandboxes or configure a larger subnet"
        )

    def _release_address(self, address: ipaddress.IPv4Interface) -> None:
        assert self.subnet is not None
        with self._lock:
            self._used.discard(int(address.ip) - int(self.subnet.network_address))

    def attach(self, pid: int) -> Attachment:
        """Create a veth pair into the network namespace of ``pid`` and configure it.

        The sandbox's end, ``eth0``, gets its address and default route from a
        thread of this process inside that namespace, before any sandbox code
        runs there.
        """
        assert self.gateway is not None
        gateway = self.gateway
        address = self._allocate()
        number = int(address.ip) - int(address.network.network_address)
        host_ifname = f"{self.veth_prefix}{number:04x}"
        created = False
        try:
            bridge = netlink.link_index(self.bridge)
            if bridge is None:
                raise OSError(0, f"bridge {self.bridge} is missing")
            netns_fd = open_netns(pid)
            try:
                # A supervisor always has a network namespace of its own, and
                # a pid that names another process must not get the veth's end.
                if os.fstat(netns_fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
                    raise OSError(
                        errno.EINVAL,
                        f"process {pid} is in the host's network namespace,"
                        " not a sandbox's",
                    )
                netlink.create_veth(host_ifname, SANDBOX_IFNAME, netns_fd, bridge)
                created = True
                _run_in_netns(
                    netns_fd,
                    lambda: netlink.configure_inside(SANDBOX_IFNAME, address, gateway),
                )
            finally:
                os.close(netns_fd)
        except BaseException:
            if created:
                netlink.delete_link(host_ifname)
            self._release_address(address)
            raise
        return Attachment(address, gateway, host_ifname)

    def detach(self, attachment: Attachment) -> None:
        """Delete the veth pair and free the address, with its conntrack entries.

        The caller has ended every process of the sandbox, so no packet
        arrives from it after the count is read.
        """
        try:
            received = netlink.received_packets(attachment.host_ifname)
            netlink.delete_link(attachment.host_ifname)
            # A conntrack entry with the sandbox's source address exists only
            # if the sandbox sent a packet, which the host end then received.
            # The flush walks the whole conntrack hash table, about 9 ms of
            # CPU with 262,144 buckets on a 2-core VM, so it is skipped when
            # the sandbox sent nothing.
            if received != 0:
                netlink.flush_conntrack(attachment.address.ip)
        finally:
            self._release_address(attachment.address)

    # Policies.

    def apply(
        self, sandbox_id: str, attachment: Attachment, policy: NetworkPolicy
    ) -> None:
        """Create the sandbox's chain and map its address to it, in one transaction."""
        assert self.nft is not None
        chain = _chain(sandbox_id)
        table = f"inet {self.table}"
        batch = [f"add chain {table} {chain}", *self._policy_rules(chain, policy)]
        element = f"{attachment.address.ip} : jump {chain}"
        batch.append(f"add element {table} sandboxes {{ {element} }}")
        self.nft.run("\n".join(batch) + "\n")

    def update(
        self,
        sandbox_id: str,
        attachment: Attachment,
        policy: NetworkPolicy,
        *,
        cut_connections: bool = True,
    ) -> None:
        """Replace the sandbox's rules and cut connections they no longer allow.

        A sandbox that has run nothing yet has no connections, and its caller
        passes ``cut_connections=False``, which leaves conntrack alone and so
        is safe on an event loop's thread (pyroute2 runs a loop of its own).
        """
        assert self.nft is not None
        chain = _chain(sandbox_id)
        batch = [
            f"flush chain inet {self.table} {chain}",
            *self._policy_rules(chain, policy),
        ]
        self.nft.run("\n".join(batch) + "\n")
        # The chain matches every packet the sandbox sends, so a now-blocked
        # destination gets no more data from it. Deleting the conntrack
        # entries stops the replies too, because the forward chain admits
        # packets into the bridge only for a tracked connection.
        if cut_connections:
            netlink.flush_conntrack(attachment.address.ip)

    def remove(self, sandbox_id: str, attachment: Attachment) -> None:
        """Delete the sandbox's map elements and chain, its veth and its address.

        The elements are the sandbox's in ``sandboxes`` and any in ``exposed``
        that ``unexpose`` did not delete.
        """
        assert self.nft is not None
        chain = _chain(sandbox_id)
        table = f"inet {self.table}"
        with self._lock:
            exposed = [
                key
                for key, address in self._exposed.items()
                if address == attachment.address.ip
            ]
            for key in exposed:
                del self._exposed[key]
        batch = [
            f"delete element {table} exposed {{ {_url_key(*key)} }}" for key in exposed
        ]
        batch.append(f"delete element {table} sandboxes {{ {attachment.address.ip} }}")
        batch.append(f"delete chain {table} {chain}")
        try:
            self.nft.run("\n".join(batch) + "\n")
            for host, host_port in exposed:
                _flush_exposed_conntrack(host, host_port)
        finally:
            self.detach(attachment)

    # Exposed ports.

    def expose(
        self,
        netns_fd: int,
        attachment: Attachment,
        host: ipaddress.IPv4Address,
        host_port: int,
        port: int,
    ) -> None:
        """Route TCP connections from the host to ``host:host_port`` into the sandbox.

        The kernel then carries them to ``port`` on the sandbox's 127.0.0.1,
        which ``netns_fd`` (the sandbox's network namespace) reaches. Only
        connections opened on the host itself take this path, because only
        the output hook translates them. The caller keeps a socket bound to
        ``host:host_port`` so that no other program takes the port.
        """
        assert self.nft is not None
        _run_in_netns(netns_fd, lambda: _expose_inside(attachment, port))
        key = (str(host), host_port)
        value = f"{attachment.address.ip} . {port}"
        with self._lock:
            if key in self._exposed:
                raise FailedPrecondition(
                    f"{host}:{host_port} already has a kernel path; "
                    "unexpose it before exposing it again"
                )
            self._exposed[key] = attachment.address.ip
        try:
            self.nft.run(
                f"add element inet {self.table} exposed "
                f"{{ {_url_key(*key)} : {value} }}\n"
            )
        except BaseException:
            with self._lock:
                self._exposed.pop(key, None)
            raise

    def unexpose(self, host: ipaddress.IPv4Address, host_port: int) -> None:
        """Delete what ``expose`` added on the host, and cut its open connections.

        The rules inside the sandbox stay until its network namespace goes.
        """
        assert self.nft is not None
        key = (str(host), host_port)
        with self._lock:
            address = self._exposed.pop(key, None)
        if address is None:
            return
        try:
            self.nft.run(
                f"delete element inet {self.table} exposed {{ {_url_key(*key)} }}\n"
            )
        except BaseException:
            # Still in the map, so remove() deletes it with the sandbox's chain.
            with self._lock:
                self._exposed[key] = address
            raise
        _flush_exposed_conntrack(*key)

    def _policy_rules(self, chain: str, policy: NetworkPolicy) -> list[str]:
        prefix = f"add rule inet {self.table} {chain}"
        rules = []
        if not policy.block and not policy.allow_list:
            return [f"{prefix} accept"]
        if policy.allow_list:
            rules.append(
                f"{prefix} ip daddr {{ {', '.join(policy.allow_list)} }} accept"
            )
        # A reset or an ICMP error, not a silent drop, so sandbox code fails
        # at once instead of waiting for a timeout.
        rules.append(f"{prefix} meta l4proto tcp reject with tcp reset")
        rules.append(f"{prefix} reject with icmpx admin-prohibited")
        return rules

    def resolv_conf(self) -> str:
        if not self.dns_servers:
            return "# the engine has no DNS servers configured\n"
        return "".join(f"nameserver {server}\n" for server in self.dns_servers)

    def ruleset(self) -> str:
        """Return the text of this engine's nftables table."""
        assert self.nft is not None
        return self.nft.run(f"list table inet {self.table}")


def _chain(sandbox_id: str) -> str:
    return sandbox_id if sandbox_id.startswith("sb-") else f"sb-{sandbox_id}"


def _url_key(host: str, host_port: int) -> str:
    return f"{host} . {host_port}"


def _enable_route_localnet(ifname: str) -> None:
    # /proc/sys/net shows the network namespace of the calling thread.
    Path(f"/proc/sys/net/ipv4/conf/{ifname}/route_localnet").write_text("1")


def _run_in_netns(netns_fd: int, function: Callable[[], None]) -> None:
    """Call ``function`` in a new thread inside the network namespace ``netns_fd``.

    setns(2) moves only the calling thread, and the thread ends with the
    call, so no other code runs in that namespace. Sockets, including
    libnftables' netlink socket, and /proc/sys/net files opened by
    ``function`` belong to that namespace. Raises what ``function`` raised.
    """
    errors: list[BaseException] = []
    target = os.fstat(netns_fd).st_ino

    def run() -> None:
        try:
            libc.setns(netns_fd, CLONE_NEWNET)
            # /proc/sys/net shows the namespace of the thread that opens it.
            if os.stat("/proc/thread-self/ns/net").st_ino != target:
                raise OSError(
                    errno.EINVAL, "setns did not move the thread into the namespace"
                )
            function()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, name="netns-setup", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _expose_inside(attachment: Attachment, port: int) -> None:
    """Rewrite connections from the gateway to ``port`` on eth0 to 127.0.0.1.

    Runs inside the sandbox's network namespace, from ``_run_in_netns``. The
    destination becomes 127.0.0.1 in prerouting, and the source becomes
    127.0.0.1 in the input hook, so a service's accept() returns a peer on
    127.0.0.1, as it does through the splice forwarder. The first call
    creates the table, and every call adds ``port`` to its set ``ports``.
    """
    # Without route_localnet, Linux drops packets to 127.0.0.0/8 that arrive
    # on eth0, and will not route replies from 127.0.0.1 out of it.
    _enable_route_localnet(SANDBOX_IFNAME)
    nft = Nft()
    try:
        batch = []
        if INSIDE_TABLE_NAME not in nft.table_names("ip"):
            batch = _inside_table_batch(attachment)
        batch.append(f"add element ip {INSIDE_TABLE_NAME} ports {{ {port} }}")
        nft.run("\n".join(batch) + "\n")
    finally:
        nft.close()


def _inside_table_batch(attachment: Attachment) -> list[str]:
    table = f"ip {INSIDE_TABLE_NAME}"
    eth0 = f'"{SANDBOX_IFNAME}"'
    return [
        f"add table {table}",
        f"add set {table} ports {{ type inet_service; }}",
        f"add chain {table} martians "
        f"{{ type filter hook prerouting priority {PRIORITY_RAW}; policy accept; }}",
        f"add chain {table} prerouting "
        f"{{ type nat hook prerouting priority {PRIORITY_DSTNAT}; policy accept; }}",
        f"add chain {table} input "
        f"{{ type nat hook input priority {PRIORITY_SRCNAT}; policy accept; }}",
        # Only the destination NAT below may produce 127.0.0.0/8 on eth0.
        f"add rule {table} martians iifname {eth0} ip saddr 127.0.0.0/8 drop",
        f"add rule {table} martians iifname {eth0} ip daddr 127.0.0.0/8 drop",
        f"add rule {table} prerouting iifname {eth0} ip saddr {attachment.gateway} "
        f"ip daddr {attachment.address.ip} tcp dport @ports dnat to 127.0.0.1",
        f"add rule {table} input iifname {eth0} ct status dnat snat to 127.0.0.1",
    ]


def _flush_exposed_conntrack(host: str, host_port: int) -> int:
    """Delete the conntrack entries of connections to ``host:host_port``.

    The kernel then stops translating their packets: the client's next
    packet reaches the host's own port, and the sandbox's next packet is
    rejected by the input chain, so both ends see the connection reset.
    Returns how many entries were deleted.
    """
    match = NFCTAttrTuple(daddr=host, proto=socket.IPPROTO_TCP, dport=host_port)
    with Conntrack() as conntrack:
        entries = list(conntrack.dump_entries(tuple_orig=match))
        return _delete_conntrack(conntrack, entries, f"{host}:{host_port}")


def _flush_translated_conntrack(subnet: ipaddress.IPv4Network) -> int:
    """Delete the conntrack entries of connections translated into ``subnet``.

    Those are connections to exposed ports that a crashed engine left: their
    reply source is in the subnet and their original destination is not.
    Sandbox egress keeps its entries, whose reply source is outside.
    Returns how many entries were deleted.
    """
    with Conntrack() as conntrack:
        entries = [
            entry
            for entry in conntrack.dump_entries()
            if entry.tuple_reply.saddr is not None
            and entry.tuple_orig.daddr is not None
            and ipaddress.ip_address(entry.tuple_reply.saddr) in subnet
            and ipaddress.ip_address(entry.tuple_orig.daddr) not in subnet
        ]
        return _delete_conntrack(conntrack, entries, f"translations into {subnet}")


def _delete_conntrack(
    conntrack: Conntrack, entries: list[ConntrackEntry], description: str
) -> int:
    deleted = 0
    for entry in entries:
        try:
            conntrack.delete(entry)
        except NetlinkError as error:
            # The entry timed out between the dump and the delete.
            if error.code != errno.ENOENT:
                raise OSError(
                    error.code,
                    f"delete conntrack entries of {description} failed: "
                    f"{os.strerror(error.code)}",
                ) from error
            continue
        deleted += 1
    return deleted


@contextlib.contextmanager
def _host_lock():  # type: ignore[no-untyped-def]
    fd = os.open(SUBNET_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_netns(pid: int) -> int:
    """Open the network namespace of ``pid``; the descriptor keeps it alive."""
    return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
