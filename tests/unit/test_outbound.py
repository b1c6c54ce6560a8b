"""The checks on the URLs that the host connects to for token holders.

Every URL here has an IP literal, so no name is looked up and no packet is
sent: the check parses the address and compares it with ranges.
"""

from __future__ import annotations

import contextvars

import pytest

from engine.core.outbound import check_outbound_url, parse_networks
from engine.core.tenancy import enter_workspace
from engine.errors import InvalidArgument, PermissionDenied


def as_token_holder(url: str, allowed: tuple[str, ...] = ()) -> None:
    def run() -> None:
        enter_workspace("team", local_admin=False)
        check_outbound_url("endpoint", url, parse_networks(allowed))

    contextvars.copy_context().run(run)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000",
        "http://127.8.9.10/",
        "http://169.254.169.254/latest",
        "http://10.1.2.3",
        "http://192.168.1.1:8080/x",
        "http://172.16.0.1",
        "http://0.0.0.0:80",
        "http://[::1]:9000",
        "http://[fe80::1]/",
        "https://100.64.0.1",
    ],
)
def test_non_public_address_rejected(url: str) -> None:
    with pytest.raises(PermissionDenied, match="allow-endpoint"):
        as_token_holder(url)


def test_public_address_allowed() -> None:
    # Parsed and compared only; nothing connects to these addresses.
    as_token_holder("https://1.1.1.1")
    as_token_holder("https://8.8.8.8:443/bucket")


def test_empty_url_allowed() -> None:
    as_token_holder("")


def test_operator_allowed_network() -> None:
    as_token_holder("http://127.0.0.1:9000", allowed=("127.0.0.1/32",))
    with pytest.raises(PermissionDenied):
        as_token_holder("http://127.0.0.2:9000", allowed=("127.0.0.1/32",))


def test_local_admin_not_limited() -> None:
    def run() -> None:
        enter_workspace("default", local_admin=True)
        check_outbound_url("endpoint", "http://127.0.0.1:9000", ())

    contextvars.copy_context().run(run)


def test_url_without_host_rejected() -> None:
    with pytest.raises(InvalidArgument, match="expected http"):
        as_token_holder("http:///path")


def test_bad_allowed_cidr_rejected() -> None:
    with pytest.raises(InvalidArgument, match="invalid --allow-endpoint 'x'"):
        parse_networks(("x",))
