"""Network policy parsing: CIDR normal form, rejected values and combinations."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.core.network import (
    NetworkPolicy,
    check_policy,
    instance_names,
    parse_allow_list,
)
from engine.errors import InvalidArgument


def test_allow_list_normal_form() -> None:
    entries = ["203.0.113.7", "198.51.100.9/24", " 192.0.2.0/24 ", "203.0.113.7/32"]
    assert parse_allow_list(entries) == (
        "203.0.113.7/32",
        "198.51.100.0/24",
        "192.0.2.0/24",
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("10.0.0.0/33", "is not a valid CIDR"),
        ("example.com", "is not a valid CIDR"),
        ("", "is not a valid CIDR"),
        ("2001:db8::/32", "IPv6"),
    ],
)
def test_allow_list_rejects_entry(entry: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as raised:
        parse_allow_list([entry])
    assert repr(entry) in str(raised.value)


def test_block_with_allow_list_invalid() -> None:
    with pytest.raises(InvalidArgument, match="block_network and allow_list"):
        check_policy(True, ("192.0.2.0/24",))


def test_policy_kinds() -> None:
    assert check_policy(False, ()) == NetworkPolicy()
    assert check_policy(True, ()) == NetworkPolicy(block=True)
    assert check_policy(False, ("192.0.2.1",)).allow_list == ("192.0.2.1/32",)


def test_instance_names_fit_kernel_limits() -> None:
    bridge, veth_prefix, table = instance_names(Path("/var/lib/engine"))
    assert bridge.startswith("eng-")
    assert table == "engine-" + bridge[4:]
    # IFNAMSIZ is 16 bytes with the NUL; a veth adds up to 5 hex digits.
    assert len(bridge) <= 15
    assert len(veth_prefix) + 5 <= 15
    assert instance_names(Path("/tmp/other")) != (bridge, veth_prefix, table)
