"""Smoke run of `python -m benchmarks.storage` with tiny sizes, on the real kernel.

It runs the module as a subprocess twice, the way the docs tell users to.
The first run gets a page without the storage markers, which it must
append. The second gets a page with them, whose text outside the markers
must stay. Each run must print every row and leave no file, mount or loop
device behind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 120.0
PAGE_WITHOUT_MARKERS = "# Benchmarks\n\nText of the page.\n"
PAGE_WITH_MARKERS = """# Benchmarks

Text before.

<!-- storage:begin -->
old storage results
<!-- storage:end -->

Text after.
"""
EXPECTED_ROWS = (
    "| upload |",
    "| download |",
    "| shutil.copyfile |",
    "| cp |",
    "| shutil.copyfile onto the layer file system |",
    "| stat |",
    "| list |",
    "| read 4 KiB |",
    "| subvolume with quota limit |",
    "| mkdir |",
    "| ext4 image per sandbox |",
)


def _run(scratch: Path, page: str, name: str) -> dict[str, object]:
    work_dir = scratch / f"work-{name}"
    work_dir.mkdir()
    docs = scratch / f"{name}.md"
    docs.write_text(page)
    command = [
        sys.executable,
        "-m",
        "benchmarks.storage",
        "--size-mib",
        "4",
        "--iterations",
        "2",
        "--warmup",
        "0",
        "--operations",
        "10",
        "--work-dir",
        str(work_dir),
        "--update-docs",
        "--docs",
        str(docs),
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return {
        "returncode": result.returncode,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "docs": docs.read_text(),
        "work_dir_entries": sorted(path.name for path in work_dir.iterdir()),
    }


def _mounts_naming(path: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        return [line for line in file if str(path) in line]


def _loop_devices_naming(path: Path) -> list[str]:
    found = []
    for entry in Path("/sys/block").iterdir():
        backing = entry / "loop" / "backing_file"
        if backing.exists() and str(path) in backing.read_text():
            found.append(entry.name)
    return found


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, dict[str, object]]]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-storage-smoke-", dir="/tmp"))
    # The sandboxes' mapped uids must traverse it to reach the data dir.
    scratch.chmod(0o755)
    try:
        results = {
            "append": _run(scratch, PAGE_WITHOUT_MARKERS, "append"),
            "replace": _run(scratch, PAGE_WITH_MARKERS, "replace"),
        }
        results["leftovers"] = {
            "mounts": _mounts_naming(scratch),
            "loop_devices": _loop_devices_naming(scratch),
        }
        yield results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.parametrize("name", ["append", "replace"])
def test_storage_benchmark_exits_zero(runs: dict, name: str) -> None:
    assert runs[name]["returncode"] == 0, runs[name]["stderr"]


@pytest.mark.parametrize("row", EXPECTED_ROWS)
def test_storage_report_has_row(runs: dict, row: str) -> None:
    assert row in runs["append"]["stdout"], runs["append"]["stderr"]


def test_storage_report_has_targets(runs: dict) -> None:
    stdout = runs["append"]["stdout"]

    assert "### Targets" in stdout
    assert "- upload median" in stdout
    assert "- download median" in stdout
    assert "- disk limit adds" in stdout


def test_update_docs_appends_section(runs: dict) -> None:
    docs = runs["append"]["docs"]

    assert docs.startswith(PAGE_WITHOUT_MARKERS)
    assert "## Storage" in docs
    assert "<!-- storage:begin -->\nRun of " in docs
    assert docs.rstrip().endswith("<!-- storage:end -->")


def test_update_docs_replaces_between_markers(runs: dict) -> None:
    docs = runs["replace"]["docs"]

    assert "old storage results" not in docs
    assert docs.startswith("# Benchmarks\n\nText before.\n\n<!-- storage:begin -->\n")
    assert docs.endswith("<!-- storage:end -->\n\nText after.\n")
    assert "## Storage" not in docs
    assert "| upload |" in docs


def test_storage_benchmark_leaves_nothing(runs: dict) -> None:
    assert runs["append"]["work_dir_entries"] == []
    assert runs["replace"]["work_dir_entries"] == []
    assert runs["leftovers"]["mounts"] == []
    assert runs["leftovers"]["loop_devices"] == []
