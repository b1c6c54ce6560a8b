"""Smoke runs of the daemon-at-scale benchmarks with tiny counts, on the real kernel.

Each of benchmarks.memory, .density, .load, .neighbours and .profile runs as
a subprocess, the way docs/benchmarks.md shows, against a copy of the docs
page. The checks: exit status 0, the report's rows, only the text between the
module's markers changed, and no process, work dir or engine cgroup of the
run left behind (the modules check their engine cgroups
themselves). Performance targets are the benchmarks' business, so no
figure is checked here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from benchmarks.pyspy import find_py_spy

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 180.0

RUNS = {
    "memory": ["--points", "0,2", "--readings", "1"],
    "density": ["--sandboxes", "3", "--clients", "2"],
    "load": ["--sandboxes", "3", "--execs", "12", "--file-ops", "10", "--clients", "2"],
    "neighbours": [
        "--neighbours",
        "1",
        "--rounds",
        "1",
        "--samples",
        "3",
        "--ramp",
        "0.2",
    ],
    # Without a warm pool the zygote uses about 0.6 ms of CPU time per cycle,
    # so 1000 Hz over 16 cycles gives it an estimated 10 samples, enough for
    # its row to appear.
    "profile": [
        "--cycles",
        "16",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--warm-pool",
        "0",
        "--rate",
        "1000",
    ],
}
# Names of the markers around each module's section, where not start and end.
MARKERS = {"profile": ("begin", "end")}

EXPECTED = {
    "memory": [
        r"\| 0 \| \d+ \| \d+ \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \|",
        r"\| 2 \| \d+ \| \d+ \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \|",
        r"\| total host memory \| -?[\d.]+ MiB \|",
        r"\| engine processes \| [\d.]+ \|",
        r"- host memory per idle sandbox ≤ 2 MiB: (met|\*\*missed\*\*)",
    ],
    "density": [
        r"Created 3 of 3 sandboxes with 2 client threads",
        r"\| exec of `true` in each, one after another: median / p99"
        r" \| [\d.]+ ms / [\d.]+ ms \|",
        r"\| execs that failed \| 0 \|",
        r"\| engine processes \| \d+ before, \d+ after \|",
        r"- 3 idle sandboxes, each answering an exec, within 24 GiB: met",
    ],
    "load": [
        r"\| exec `true` \| 12 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 0 \|",
        r"\| find_in_files \| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 0 \|",
        r"\| all file operations \| 10 \|",
        r"- 0 errors: met \(0 errors\)",
    ],
    "neighbours": [
        r"\| idle \| 3 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
        r"\| 1 busy neighbours \| 3 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
        r"- p50 with busy neighbours ≤ 3x the idle p50: (met|\*\*missed\*\*)",
    ],
    "profile": [
        r"\| whole cycle, p50 \(ms\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
        r"\| CPU of py-spy \(ms\) \|  \| [\d.]+ \|  \|",
        r"\| CPU of perf \(ms\) \|  \|  \| [\d.]+ \|",
        r"\| daemon \| py-spy on daemon and zygote \| \d+, 1 \|",
        r"\| zygote \| py-spy on daemon and zygote \| \d+, 1 \|",
        r"#### Pool 0: daemon, \d+ samples",
    ],
}


def _processes_naming(path: Path) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(f"{process.info['pid']}: {cmdline}")
    return found


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temporary dir under /tmp that the sandboxes' mapped uids can traverse."""
    path = Path(tempfile.mkdtemp(prefix="bench-scale-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("module", sorted(RUNS))
def test_scale_benchmark_smoke(module: str, scratch: Path) -> None:
    if module == "profile":
        try:
            find_py_spy()
        except SystemExit as error:
            pytest.skip(str(error))
    work_dir = scratch / "work"
    work_dir.mkdir()
    docs = scratch / "benchmarks.md"
    opening, closing = MARKERS.get(module, ("start", "end"))
    start, end = f"<!-- {module}:{opening} -->", f"<!-- {module}:{closing} -->"
    docs.write_text(f"intro\n{start}\nold\n{end}\nrest\n")

    # The exit status is 1 when the daemon's processes, work dir or cgroups
    # were left behind; running_daemon checks each.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            f"benchmarks.{module}",
            *RUNS[module],
            "--work-dir",
            str(work_dir),
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
    for pattern in EXPECTED[module]:
        assert re.search(pattern, result.stdout), (pattern, result.stdout)
    assert "Machine: " in result.stdout
    assert "kernel " in result.stdout
    assert "cgroup v" in result.stdout
    assert "One-minute load average" in result.stdout
    text = docs.read_text()
    assert text.startswith(f"intro\n{start}\n")
    assert text.endswith(f"{end}\nrest\n")
    assert "\nold\n" not in text
    assert list(work_dir.iterdir()) == []
    assert _processes_naming(work_dir) == []
