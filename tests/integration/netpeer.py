"""A test "remote host": a network namespace the test owns, reached through the host.

``RemoteHost`` creates network namespace ``engine-test-<token>`` and a veth
pair ``tr<token>`` (host end) / ``eth0`` (inside) on a /30 in 198.18.0.0/15,
the range RFC 2544 sets aside for benchmark tests, that no host route
overlaps. Inside it runs ``netpeer_server.py``: TCP echo on 7000, UDP echo on
7001 and DNS on 53. Sandboxes reach it only through the host's routing, with
the host end as the engine's uplink, so no packet of a test goes anywhere
but namespaces the test made. ``close`` removes the server, the veth pair and
the namespace by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

from engine.runtime import netlink

SERVER = Path(__file__).with_name("netpeer_server.py")
TEST_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
TCP_PORT = 7000
UDP_PORT = 7001
CLONE_NEWNET = 0x40000000
READY_TIMEOUT = 10.0


def _free_slash30() -> ipaddress.IPv4Network:
    taken = netlink.ipv4_routes() + [a.network for a in netlink.ipv4_addresses()]
    candidates = list(TEST_RANGE.subnets(new_prefix=30))
    for _ in range(1000):
        subnet = candidates[secrets.randbelow(len(candidates))]
        if not any(route.overlaps(subnet) for route in taken):
            return subnet
    raise AssertionError(f"no free /30 in {TEST_RANGE}")


class RemoteHost:
    def __init__(self) -> None:
        token = secrets.token_hex(4)
        self.netns = f"engine-test-{token}"
        self.host_ifname = f"tr{token}"
        subnet = _free_slash30()
        hosts = list(subnet.hosts())
        self.host_address = str(hosts[0])
        self.address = str(hosts[1])
        self.prefix = subnet.prefixlen
        fd, log_path = tempfile.mkstemp(prefix="netpeer-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RemoteHost:
        netns.create(self.netns)
        try:
            self._link()
            self._serve()
        except BaseException:
            self.close()
            raise
        return self

    def _link(self) -> None:
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=self.host_ifname,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": self.netns},
            )
            index = ipr.link_lookup(ifname=self.host_ifname)[0]
            ipr.addr(
                "add", index=index, address=self.host_address, prefixlen=self.prefix
            )
            ipr.link("set", index=index, state="up")
        # Replies to sandboxes arrive on this test-owned interface, and Linux
        # forwards an IPv4 packet only if its input interface allows it.
        Path(f"/proc/sys/net/ipv4/conf/{self.host_ifname}/forwarding").write_text("1")
        with NetNS(self.netns) as ns:
            for name in ("lo", "eth0"):
                ns.link("set", index=ns.link_lookup(ifname=name)[0], state="up")
            index = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=index, address=self.address, prefixlen=self.prefix)

    def _serve(self) -> None:
        path = f"/run/netns/{self.netns}"

        def enter() -> None:
            fd = os.open(path, os.O_RDONLY)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                os._exit(111)

        self.process = subprocess.Popen(
            [sys.executable, str(SERVER), self.address, str(self.log_path)],
            preexec_fn=enter,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if any(event["event"] == "ready" for event in self.events()):
                return
            if self.process.poll() is not None:
                raise AssertionError(
                    f"netpeer server exited with {self.process.returncode}"
                )
            time.sleep(0.05)
        raise AssertionError("netpeer server did not start")

    def events(self, kind: str | None = None) -> list[dict[str, str]]:
        lines = self.log_path.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.strip()]
        return [e for e in events if kind is None or e["event"] == kind]

    def run_inside(
        self, code: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` in the remote host's namespace."""
        path = f"/run/netns/{self.netns}"

        def enter() -> None:
            fd = os.open(path, os.O_RDONLY)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                os._exit(111)

        return subprocess.run(
            [sys.executable, "-c", code],
            preexec_fn=enter,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def add_route(self, destination: str) -> None:
        """Route ``destination`` from the remote host back through the host."""
        with NetNS(self.netns) as ns:
            ns.route("add", dst=destination, gateway=self.host_address)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            netlink.delete_link(self.host_ifname)
        with contextlib.suppress(OSError, FileNotFoundError):
            netns.remove(self.netns)
        self.log_path.unlink(missing_ok=True)


def host_listener(address: str) -> socket.socket:
    """A listening TCP socket of the host on ``address``, port chosen by the kernel."""
    listener = socket.create_server((address, 0), backlog=8)
    listener.setblocking(False)
    return listener
