"""Smoke run of `python -m benchmarks.network` with tiny counts, on the real kernel.

It runs the module as a subprocess, the way docs/benchmarks.md shows,
with a copy of the docs page, and checks the report rows, that only the text
between the markers changed, and that no bridge, veth or nftables table of
the run is left.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from engine.runtime import netlink
from engine.runtime.nftables import Nft

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 120.0


def test_network_benchmark_smoke(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("intro\n<!-- network:begin -->\nold\n<!-- network:end -->\nrest\n")
    tables_before = set(Nft().table_names("inet"))
    links_before = set(netlink.link_names())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.network",
            "--iterations",
            "2",
            "--size-mib",
            "4",
            "--repeats",
            "1",
            "--pause",
            "0.05",
            "--update-docs",
            "--docs",
            str(docs),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"\| create, median of 2 \| [\d.]+ ms \|", result.stdout)
    assert re.search(r"\| TCP throughput, median of 1 \| \d+ MiB/s", result.stdout)
    assert "(exposed port, networked sandbox, kernel path)" in result.stdout
    assert "(exposed port, loopback-only sandbox, splice forwarder)" in result.stdout
    assert "through a veth pair" in result.stdout
    text = docs.read_text()
    assert text.startswith("intro\n<!-- network:begin -->\n")
    assert text.endswith("<!-- network:end -->\nrest\n")
    assert "old" not in text
    assert "| create, median of 2 |" in text
    engine_tables = {
        name for name in Nft().table_names("inet") if name.startswith("engine-")
    }
    assert engine_tables <= tables_before
    new_links = set(netlink.link_names()) - links_before
    assert not [name for name in new_links if name.startswith(("eng-", "ev", "bv"))]
