"""Smoke run of `python -m benchmarks.http` with tiny counts, against a real daemon.

It checks that one run prints every row of the report and that
--update-docs replaces only the text between the markers of a docs file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Seconds the whole run may take, daemon start and stop included.
RUN_TIMEOUT = 120.0


def run_benchmark(docs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.http",
            "--latency-requests",
            "5",
            "--requests",
            "20",
            "--concurrency",
            "2",
            "--tasks",
            "10",
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


def test_http_benchmark_smoke(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nIntro.\n")
    first = run_benchmark(docs)
    assert first.returncode == 0, first.stderr
    for row in (
        "warm endpoint p50 (ms)",
        "warm endpoint p99 (ms)",
        "throughput (requests/s)",
        "tasks, submit to COMPLETE (tasks/s)",
    ):
        assert row in first.stdout, row
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nIntro.\n")
    assert "## HTTP routes" in text
    assert text.count("<!-- http:begin -->") == 1
    assert text.count("<!-- http:end -->") == 1

    docs.write_text(text + "\nAfter the markers.\n")
    second = run_benchmark(docs)
    assert second.returncode == 0, second.stderr
    updated = docs.read_text()
    assert updated.count("## HTTP routes") == 1
    assert updated.count("<!-- http:begin -->") == 1
    assert updated.endswith("\nAfter the markers.\n")
