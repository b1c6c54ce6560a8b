"""Checks on the URLs that the host itself connects to for API callers.

Bucket and fsspec volume endpoints are fetched by FUSE servers, and task
callbacks are posted by the daemon, both from the host's network namespace.
That namespace reaches what sandboxes cannot: the host's loopback services,
the exposed ports of every workspace, link-local and metadata addresses, and
private networks. A caller with a token may therefore name only public
addresses, unless the operator allows more with ``Config.outbound_allow``
(`engine serve --allow-endpoint CIDR`). The local admin, the unix socket's
caller without a token, is trusted like the host and is not checked.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse

from engine.core.tenancy import is_local_admin
from engine.errors import InvalidArgument, PermissionDenied

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: tuple[str, ...]) -> tuple[Network, ...]:
    """Parse the operator's allowed CIDRs; raise InvalidArgument naming a bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise InvalidArgument(
                f"invalid --allow-endpoint {value!r}: expected a CIDR such as"
                " 127.0.0.1/32"
            ) from None
    return tuple(networks)


def _is_public(address: Address) -> bool:
    return address.is_global and not address.is_multicast


def _resolve(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    # NOTE: the FUSE server or the callback client resolves the name again
    # when it connects, so a name whose records change in between (DNS
    # rebinding) can still reach an address that this check rejected.
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise InvalidArgument(f"cannot resolve host {host!r}: {error}") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def check_outbound_url(field: str, url: str, allowed: tuple[Network, ...]) -> None:
    """Raise PermissionDenied if a token holder's ``url`` leads to a non-public address.

    Empty URLs (AWS's own endpoint) pass. So does every URL of the local admin.
    """
    if not url or is_local_admin():
        return
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    if not host:
        raise InvalidArgument(f"invalid {field} {url!r}: expected http(s)://HOST")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise InvalidArgument(f"invalid {field} {url!r}: bad port") from None
    for address in _resolve(host, port):
        if _is_public(address) or any(address in network for network in allowed):
            continue
        raise PermissionDenied(
            f"{field} {url!r} leads to {address}, a loopback, private or reserved"
            " address that API tokens may not make the host connect to; use a"
            " public endpoint, or ask the operator to allow it with"
            " `engine serve --allow-endpoint CIDR`"
        )
