"""Smoke run of `python -m benchmarks.storage_fuse` with tiny sizes.

It runs the benchmark as a subprocess, the way docs/benchmarks.md shows,
against the real kernel, FUSE and moto, and checks its output, the docs
section it writes and that it leaves no mount or data dir behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_ROWS = [
    ("bucket mount", "sequential read"),
    ("volume, local", "write"),
    ("volume, local", "read"),
    ("volume, memory://", "write"),
    ("volume, memory://", "read"),
    ("volume, s3://", "write"),
    ("volume, s3://", "read"),
]


def bench_dirs() -> set[str]:
    return {path.name for path in Path("/tmp").glob("eng-fuse-bench-*")}


def test_storage_fuse_benchmark_smoke() -> None:
    before = bench_dirs()
    with tempfile.TemporaryDirectory() as work:
        docs = Path(work) / "benchmarks.md"
        docs.write_text("# Benchmarks\n\nEarlier text.\n")
        results = Path(work) / "results.json"
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.storage_fuse",
                "--object-mib",
                "2",
                "--volume-mib",
                "1",
                "--repeats",
                "1",
                "--update-docs",
                "--docs",
                str(docs),
                "--json",
                str(results),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        data = json.loads(results.read_text())
        rows = [(row["mount"], row["operation"]) for row in data["rows"]]
        assert rows == EXPECTED_ROWS
        for row in data["rows"]:
            assert len(row["samples_mb_per_s"]) == 1
            assert row["median_mb_per_s"] > 0
        text = docs.read_text()
        assert text.startswith("# Benchmarks\n\nEarlier text.\n")
        assert "## FUSE storage" in text
        assert text.count("<!-- storage-fuse:begin -->") == 1
        assert "| bucket mount | sequential read | 2 MiB |" in text
        assert completed.stdout in text
        # A second run replaces the section instead of adding one.
        again = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.storage_fuse",
                "--object-mib",
                "1",
                "--volume-mib",
                "1",
                "--repeats",
                "1",
                "--update-docs",
                "--docs",
                str(docs),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert again.returncode == 0, again.stderr
        text = docs.read_text()
        assert text.count("## FUSE storage") == 1
        assert "| bucket mount | sequential read | 1 MiB |" in text
        assert "| bucket mount | sequential read | 2 MiB |" not in text
    assert bench_dirs() == before
    with open("/proc/self/mountinfo") as table:
        assert "eng-fuse-bench-" not in table.read()
    leftovers = [
        process.pid
        for process in psutil.process_iter(["cmdline"])
        if any("eng-fuse-bench-" in part for part in process.info["cmdline"] or ())
    ]
    assert leftovers == []
