"""Smoke run of `python -m benchmarks` with tiny counts, against the real kernel.

It runs the harness as a subprocess, the way the docs tell users to, and
checks the result files: every row present, each with its samples, every
isolation probe parsed, and nothing left in the work dir.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 2
# Seconds the whole harness run may take.
RUN_TIMEOUT = 120.0
EXPECTED_ROWS = {
    ("cold_start", "engine-grpc"),
    ("cold_start", "engine-grpc-net"),
    ("cold_start", "engine-embedded"),
    ("cold_start", "bwrap"),
    ("cold_start", "runc"),
    ("cold_start", "posix-spawn"),
    ("cold_start", "fork-exec"),
    ("cold_start", "subprocess"),
    ("exec", "engine-grpc"),
    ("exec", "engine-grpc-run"),
    ("exec", "engine-direct"),
    ("exec", "engine-direct-run"),
    ("exec", "engine-grpc-health"),
    ("exec", "engine-embedded"),
    ("exec", "runc"),
    ("exec", "posix-spawn"),
    ("exec", "fork-exec"),
    ("exec", "subprocess"),
    ("exec_burst", "engine-grpc"),
    ("exec_burst", "engine-grpc-run"),
    ("exec_burst", "engine-direct"),
    ("exec_burst", "engine-direct-run"),
    ("exec_burst", "engine-embedded"),
    ("exec_burst", "runc"),
    ("exec_burst", "posix-spawn"),
    ("exec_burst", "fork-exec"),
    ("exec_burst", "subprocess"),
    ("throughput", "engine-sdk-1-clients"),
    ("throughput", "engine-sdk-4-clients"),
    ("throughput", "engine-sdk-4-clients-sustained"),
}
DOCS_TEMPLATE = """# Benchmarks

Text before the results.

<!-- results:start -->
old results
<!-- results:end -->

Text after the results.
"""


def _processes_naming(path: Path) -> list[str]:
    """Describe live processes whose command line contains ``path``."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(f"{process.info['pid']}: {cmdline}")
    return found


@pytest.fixture(scope="module")
def smoke_run() -> Iterator[dict]:
    """Run the harness once and yield its paths, output and parsed JSON."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-smoke-", dir="/tmp"))
    # The sandboxes' mapped uids must traverse it to reach the data dirs.
    scratch.chmod(0o755)
    work_dir = scratch / "work"
    results_dir = scratch / "results"
    docs = scratch / "benchmarks.md"
    work_dir.mkdir()
    docs.write_text(DOCS_TEMPLATE)

    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--iterations",
        str(ITERATIONS),
        "--warmup",
        "0",
        "--throughput-cycles",
        "1",
        "--sustained-cycles",
        "2",
        "--refill",
        "0.1",
        "--burst",
        "2",
        "--pause",
        "0",
        "--no-install",
        "--work-dir",
        str(work_dir),
        "--results-dir",
        str(results_dir),
        "--update-docs",
        "--docs",
        str(docs),
    ]

    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM makes the harness cancel its run and clean up first.
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        shutil.rmtree(scratch, ignore_errors=True)
        pytest.fail(
            f"python -m benchmarks ran longer than {RUN_TIMEOUT} s; stderr:\n{stderr}"
        )

    try:
        json_files = sorted(results_dir.glob("*.json"))
        data = json.loads(json_files[0].read_text()) if json_files else None
        yield {
            "returncode": process.returncode,
            "stdout": stdout,
            "stderr": stderr,
            "json_files": json_files,
            "markdown_files": sorted(results_dir.glob("*.md")),
            "data": data,
            "work_dir_entries": sorted(p.name for p in work_dir.iterdir()),
            "processes_naming_work_dir": _processes_naming(work_dir),
            "docs": docs.read_text(),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_harness_exits_zero(smoke_run: dict) -> None:
    assert smoke_run["returncode"] == 0, smoke_run["stderr"]


def test_harness_writes_one_json_and_markdown(smoke_run: dict) -> None:
    assert len(smoke_run["json_files"]) == 1, smoke_run["stderr"]
    assert len(smoke_run["markdown_files"]) == 1, smoke_run["stderr"]
    assert smoke_run["json_files"][0].stem == smoke_run["markdown_files"][0].stem


def test_results_have_every_row(smoke_run: dict) -> None:
    data = smoke_run["data"]
    assert data is not None, smoke_run["stderr"]
    rows = {(case["measurement"], case["system"]) for case in data["cases"]}
    assert rows == EXPECTED_ROWS


@pytest.mark.parametrize("row", sorted(EXPECTED_ROWS))
def test_row_has_samples(smoke_run: dict, row: tuple[str, str]) -> None:
    data = smoke_run["data"]
    assert data is not None, smoke_run["stderr"]
    case = next(
        case for case in data["cases"] if (case["measurement"], case["system"]) == row
    )
    assert case["unavailable"] == "", case["unavailable"]
    assert case["error"] == "", case["error"]
    assert len(case["samples"]) == ITERATIONS
    assert all(value > 0 for value in case["samples"])
    assert case["summary"]["min"] <= case["summary"]["median"]
    assert case["summary"]["median"] <= case["summary"]["p95"]


def test_throughput_records_each_cycle(smoke_run: dict) -> None:
    data = smoke_run["data"]
    assert data is not None, smoke_run["stderr"]
    cases = {case["system"]: case for case in data["cases"]}
    single = cases["engine-sdk-1-clients"]["details"]["cycle_seconds"]
    four = cases["engine-sdk-4-clients"]["details"]["cycle_seconds"]
    assert len(single) == ITERATIONS * 1
    assert len(four) == ITERATIONS * 4


def test_engine_rows_probe_every_layer(smoke_run: dict) -> None:
    data = smoke_run["data"]
    assert data is not None, smoke_run["stderr"]
    engine_systems = (
        "engine-grpc",
        "engine-grpc-run",
        "engine-direct",
        "engine-direct-run",
        "engine-embedded",
    )
    for system in engine_systems:
        layers = data["layers"][system]
        assert "error" not in layers, layers
        assert all(layers["namespaces"].values()), (system, layers["namespaces"])
        assert layers["seccomp"], system
        assert layers["overlay_root"], (system, layers["root_fs_type"])
        assert layers["loopback_only"], (system, layers["interfaces"])
        assert layers["cgroup_limits"], system


def test_bridged_row_probes_a_network(smoke_run: dict) -> None:
    data = smoke_run["data"]
    assert data is not None, smoke_run["stderr"]
    layers = data["layers"]["engine-grpc-net"]
    assert "error" not in layers, layers
    assert all(layers["namespaces"].values()), layers["namespaces"]
    assert layers["seccomp"]
    assert not layers["loopback_only"], layers["interfaces"]
    assert "lo" in layers["interfaces"]
    assert len(layers["interfaces"]) == 2, layers["interfaces"]


def test_comparison_rows_probe_their_layers(smoke_run: dict) -> None:
    data = smoke_run["data"]
    assert data is not None, smoke_run["stderr"]
    bwrap = data["layers"]["bwrap"]
    runc = data["layers"]["runc"]
    host = data["layers"]["posix-spawn"]
    assert bwrap["namespaces"]["pid"]
    assert not bwrap["seccomp"]
    assert runc["namespaces"]["mnt"]
    assert not runc["namespaces"]["user"]
    assert not any(host["namespaces"].values())


def test_report_lists_machine_and_targets(smoke_run: dict) -> None:
    data = smoke_run["data"]
    assert data is not None, smoke_run["stderr"]
    markdown = data["markdown"]
    assert data["machine"]["kernel"] in markdown
    assert "cgroup v1" in markdown or "cgroup v2" in markdown
    assert "One-minute load average: " in markdown
    assert "### Targets" in markdown
    assert len(data["targets"]) == 9
    assert all(target["met"] is not None for target in data["targets"])


def test_markdown_file_matches_stdout(smoke_run: dict) -> None:
    markdown = smoke_run["markdown_files"][0].read_text()
    assert markdown.strip() in smoke_run["stdout"]


def test_update_docs_replaces_results_only(smoke_run: dict) -> None:
    docs = smoke_run["docs"]
    assert "old results" not in docs
    assert docs.startswith("# Benchmarks\n\nText before the results.\n")
    assert docs.endswith("<!-- results:end -->\n\nText after the results.\n")
    assert "### Targets" in docs


def test_cleanup_leaves_nothing(smoke_run: dict) -> None:
    data = smoke_run["data"]
    assert data is not None, smoke_run["stderr"]
    assert data["cleanup_problems"] == []
    assert smoke_run["work_dir_entries"] == []
    assert smoke_run["processes_naming_work_dir"] == []
