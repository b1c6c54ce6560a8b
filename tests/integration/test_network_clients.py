"""Networking through every client: the CLI, the asyncio SDK and EmbeddedEngine.

The sandboxes here send no packets: they check interfaces, policies stored
in the spec, URLs and errors. Egress itself is tested in
test_network_egress.py against a test-owned remote host.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import ENGINE_BIN, make_data_dir

from engine import Sandbox, errors
from engine.core.network import instance_names
from engine.runtime import netlink
from engine.runtime.nftables import Nft
from engine.sdk.aio import AsyncSandbox
from engine.sdk.embedded import EmbeddedEngine

LISTENER = (
    "import socket; s = socket.create_server(('127.0.0.1', 8000));"
    " print('listening', flush=True); c, _ = s.accept(); c.sendall(b'hi')"
)


def cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENGINE_BIN), "--address", address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_run_block_network(address: str) -> None:
    result = cli(
        address,
        "run",
        "--block-network",
        "--",
        "python3",
        "-c",
        "import socket; print([n for _, n in socket.if_nameindex()])",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['lo']"


def test_cli_create_allow_list(address: str) -> None:
    created = cli(
        address,
        "sandbox",
        "create",
        "--allow",
        "198.51.100.0/24",
        "--allow",
        "203.0.113.7",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    sandbox_id = info["sandbox_id"]
    try:
        assert info["spec"]["allow_list"] == ["198.51.100.0/24", "203.0.113.7/32"]
        assert info["spec"]["block_network"] is False
    finally:
        cli(address, "sandbox", "rm", sandbox_id)


def test_cli_rejects_both_options(address: str) -> None:
    result = cli(
        address, "run", "--block-network", "--allow", "198.51.100.0/24", "--", "true"
    )
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_cli_bad_cidr_named(address: str) -> None:
    result = cli(address, "sandbox", "create", "--allow", "300.1.2.3/8")
    assert result.returncode != 0
    assert "'300.1.2.3/8'" in result.stderr


def test_cli_expose_and_urls(address: str) -> None:
    with Sandbox(address=address).create() as sb:
        process = sb.process.exec("python3", "-c", LISTENER)
        _wait_for(lambda: b"listening" in process.stdout.read_available())
        exposed = cli(address, "sandbox", "expose", sb.sandbox_id, "8000")
        assert exposed.returncode == 0, exposed.stderr
        url = exposed.stdout.strip()
        assert url.startswith("http://127.0.0.1:")
        listed = cli(address, "sandbox", "urls", sb.sandbox_id)
        assert listed.stdout == f"8000\t{url}\n"
        as_json = cli(address, "sandbox", "urls", sb.sandbox_id, "--json")
        assert json.loads(as_json.stdout) == {"8000": url}
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as conn:
            assert conn.recv(16) == b"hi"


def test_aio_network_methods(address: str) -> None:
    async def scenario() -> None:
        async with await AsyncSandbox(address=address).create() as sb:
            info = await sb.update_network_permissions(allow_list=["192.0.2.0/24"])
            assert info.spec.allow_list == ("192.0.2.0/24",)
            info = await sb.update_network_permissions(block_network=True)
            assert info.spec.block_network is True
            assert await sb.list_urls() == {}
            url = await sb.expose_port(8000)
            assert await sb.list_urls() == {8000: url}
            with pytest.raises(errors.InvalidArgument, match="65536"):
                await sb.expose_port(65536)

    asyncio.run(scenario())


def test_sdk_rejects_string_allow_list(address: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="list of CIDRs"):
        Sandbox(address=address, allow_list="198.51.100.0/24")  # type: ignore[arg-type]


def test_embedded_engine_network_settings() -> None:
    data_dir = make_data_dir()
    engine = EmbeddedEngine(data_dir, dns_servers=("192.0.2.53",))
    engine.start()
    try:
        with Sandbox(address=engine.address).create() as sb:
            resolv = sb.fs.read_text("/etc/resolv.conf")
            assert resolv == "nameserver 192.0.2.53\n"
            assert sb.status().address
    finally:
        engine.stop()
        _remove(data_dir)


def test_daemon_default_blocks_network(daemon_factory: Any) -> None:
    daemon = daemon_factory("--block-network-by-default")
    with Sandbox(address=daemon.address).create() as sb:
        info = sb.status()
        assert info.spec.block_network is True
        assert info.address == ""
    with Sandbox(address=daemon.address, allow_list=["192.0.2.0/24"]).create() as sb:
        info = sb.status()
        assert info.spec.block_network is False
        assert info.address


def test_daemon_rejects_missing_uplink(data_dir: Path) -> None:
    result = subprocess.run(
        [
            str(ENGINE_BIN),
            "serve",
            "--data-dir",
            str(data_dir),
            "--uplink",
            "no-such-if0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "'no-such-if0' does not exist" in result.stderr
    # Rejected before the engine touched the data dir.
    assert not (data_dir / "sandboxes").exists()


def test_daemon_rejects_bad_dns(data_dir: Path) -> None:
    result = subprocess.run(
        [str(ENGINE_BIN), "serve", "--data-dir", str(data_dir), "--dns", "dns.example"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "'dns.example' is not an IPv4 address" in result.stderr
    assert not (data_dir / "sandboxes").exists()


def _wait_for(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def test_auto_uplink_uses_default_routes(daemon_factory: Any) -> None:
    expected = netlink.default_route_interfaces()
    assert expected, "the host has no IPv4 default route to resolve"
    daemon = daemon_factory("--uplink", "auto")
    _, _, table = instance_names(daemon.data_dir)
    nft = Nft()
    try:
        egress = nft.run(f"list chain inet {table} egress")
    finally:
        nft.close()
    names = ", ".join(f'"{name}"' for name in expected)
    if len(expected) == 1:
        assert f"oifname != {names} drop" in egress
    else:
        assert f"oifname != {{ {names} }} drop" in egress
    # Only the ruleset is read: no sandbox sends a packet in this test.
    assert "uplinks " + ", ".join(expected) in daemon.log()
