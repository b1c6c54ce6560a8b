"""`python -m benchmarks.load`: execs and file operations over many sandboxes at once.

    sudo .venv/bin/python -m benchmarks.load --update-docs

It creates ``--sandboxes`` sandboxes in a real `engine serve` daemon, then
runs ``--execs`` execs of `true` and ``--file-ops`` file operations
(write_bytes, read_bytes, stat_file, list_files and find_in_files, in turn)
spread evenly over the sandboxes and shuffled into one sequence. ``--clients``
threads, each with its own channel, take the next operation from that
sequence until none is left. It reports the latency of each kind (p50, p99),
every error, and the wall time of the whole sequence.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import logging
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.daemonrun import (
    add_common_arguments,
    check_root,
    configure_logging,
    header,
    load_average,
    running_daemon,
    write_section,
)
from benchmarks.engines import TRUE_ARGV, create, run_to_exit, spec_proto, terminate
from benchmarks.report import percentile
from engine.sdk.client import Client
from engine.sdk.files import SandboxFileSystem

logger = logging.getLogger(__name__)

SECTION_START = "<!-- load:start -->"
SECTION_END = "<!-- load:end -->"
EXEC = "exec `true`"
FILE_KINDS = ("write_bytes", "read_bytes", "stat_file", "list_files", "find_in_files")
# Files of each sandbox: one written at setup and only read, one rewritten.
SEED_PATH = "/root/seed.txt"
WRITTEN_PATH = "/root/written.txt"
SEED_TEXT = "".join(f"line {number} of the seed file\n" for number in range(100))
SEED_TEXT += "the needle\n"
WRITTEN_BYTES = b"x" * 4096


@dataclass
class Results:
    """Seconds of each operation by kind, the errors, and the wall time."""

    seconds: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    errors: list[str] = field(default_factory=list)
    error_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    wall_seconds: float = 0.0
    setup_seconds: float = 0.0


def make_schedule(
    sandboxes: int, execs: int, file_ops: int, seed: int
) -> list[tuple[str, int]]:
    """Return (kind, sandbox index) pairs: execs and file ops, spread and shuffled."""
    schedule = [(EXEC, index % sandboxes) for index in range(execs)]
    schedule += [
        (FILE_KINDS[index % len(FILE_KINDS)], index % sandboxes)
        for index in range(file_ops)
    ]
    random.Random(seed).shuffle(schedule)
    return schedule


def _operation(kind: str, client: Client, sandbox_id: str) -> Callable[[], Any]:
    files = SandboxFileSystem(client, sandbox_id)
    operations: dict[str, Callable[[], Any]] = {
        EXEC: lambda: run_to_exit(client, sandbox_id, TRUE_ARGV),
        "write_bytes": lambda: files.write_bytes(WRITTEN_PATH, WRITTEN_BYTES),
        "read_bytes": lambda: files.read_bytes(SEED_PATH),
        "stat_file": lambda: files.stat_file(SEED_PATH),
        "list_files": lambda: files.list_files("/root"),
        "find_in_files": lambda: files.find_in_files("/root", "needle"),
    }
    return operations[kind]


def _check(kind: str, result: Any) -> None:
    """Raise RuntimeError when a file operation returned the wrong content."""
    if kind == "read_bytes" and result != SEED_TEXT.encode():
        raise RuntimeError(f"read_bytes returned {len(result)} unexpected bytes")
    if kind == "find_in_files" and not any(match.path == SEED_PATH for match in result):
        raise RuntimeError("find_in_files did not find the needle in the seed file")


def set_up(address: str, count: int, clients: int) -> tuple[list[str], float]:
    """Create ``count`` sandboxes, each with its seed file; return ids and seconds."""

    def make(_: int) -> str:
        with Client(address) as client:
            sandbox_id = create(client, spec_proto(block_network=True, ttl=0))
            SandboxFileSystem(client, sandbox_id).write_text(SEED_PATH, SEED_TEXT)
            return sandbox_id

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as executor:
        futures = [executor.submit(make, index) for index in range(count)]
        sandbox_ids = [future.result() for future in futures]
    return sandbox_ids, time.perf_counter() - started


def run_schedule(
    address: str,
    sandbox_ids: list[str],
    schedule: list[tuple[str, int]],
    clients: int,
) -> Results:
    """Run ``schedule`` with ``clients`` threads, each taking the next operation."""
    results = Results()
    lock = threading.Lock()
    position = [0]

    def worker() -> None:
        seconds: dict[str, list[float]] = collections.defaultdict(list)
        with Client(address) as client:
            while True:
                with lock:
                    if position[0] == len(schedule):
                        break
                    kind, index = schedule[position[0]]
                    position[0] += 1
                sandbox_id = sandbox_ids[index]
                operation = _operation(kind, client, sandbox_id)
                begin = time.perf_counter()
                try:
                    _check(kind, operation())
                except Exception as error:
                    with lock:
                        results.error_counts[kind] += 1
                        if len(results.errors) < 10:
                            results.errors.append(
                                f"{kind} in {sandbox_id}: {type(error).__name__}:"
                                f" {error}"
                            )
                    continue
                seconds[kind].append(time.perf_counter() - begin)
        with lock:
            for kind, values in seconds.items():
                results.seconds[kind].extend(values)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as executor:
        for future in [executor.submit(worker) for _ in range(clients)]:
            future.result()
    results.wall_seconds = time.perf_counter() - started
    return results


def render(
    results: Results, sandboxes: int, schedule: list[tuple[str, int]], clients: int
) -> str:
    operations = len(schedule)
    lines = [
        f"{sandboxes} sandboxes (created, each with a seed file, in"
        f" {results.setup_seconds:.1f} s), {operations} operations from"
        f" {clients} client threads.",
        "",
        "| operation | count | p50 (ms) | p99 (ms) | max (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    counts = collections.Counter(kind for kind, _ in schedule)
    for kind in (EXEC, *FILE_KINDS):
        values = results.seconds.get(kind, [])
        errors = results.error_counts[kind]
        if not values:
            lines.append(f"| {kind} | {counts[kind]} | - | - | - | {errors} |")
            continue
        lines.append(
            f"| {kind} | {counts[kind]} | {statistics.median(values) * 1000:.1f}"
            f" | {percentile(values, 0.99) * 1000:.1f} | {max(values) * 1000:.1f}"
            f" | {errors} |"
        )
    file_values = [
        value for kind in FILE_KINDS for value in results.seconds.get(kind, [])
    ]
    if file_values:
        lines.append(
            f"| all file operations | {len(file_values)}"
            f" | {statistics.median(file_values) * 1000:.1f}"
            f" | {percentile(file_values, 0.99) * 1000:.1f}"
            f" | {max(file_values) * 1000:.1f}"
            f" | {sum(results.error_counts[kind] for kind in FILE_KINDS)} |"
        )
    total_errors = sum(results.error_counts.values())
    verdict = "met" if total_errors == 0 else "**missed**"
    lines += [
        "",
        f"Wall time of all {operations} operations: {results.wall_seconds:.1f} s"
        f" ({operations / results.wall_seconds:.0f} operations/s).",
        "",
        f"- 0 errors: {verdict} ({total_errors} errors).",
    ]
    if results.errors:
        lines += ["", "First errors:", ""]
        lines += [f"- {error}" for error in results.errors]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Run execs and file operations over many sandboxes of one"
        " engine daemon at once, from several client threads, and report the"
        " latency of each kind and every error. Needs root.",
    )
    parser.add_argument(
        "--sandboxes",
        type=int,
        default=200,
        metavar="N",
        help="sandboxes alive during the run (default: 200)",
    )
    parser.add_argument(
        "--execs",
        type=int,
        default=10000,
        metavar="N",
        help="execs of `true` spread over the sandboxes (default: 10000)",
    )
    parser.add_argument(
        "--file-ops",
        type=int,
        default=5000,
        metavar="N",
        help="file operations spread over the sandboxes, the five kinds in"
        " turn (default: 5000)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=8,
        metavar="N",
        help="client threads, each with its own channel (default: 8)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the shuffle of the operations (default: 1)",
    )
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    options = build_parser().parse_args(arguments)
    configure_logging(options.log_level)
    check_root()
    if min(options.sandboxes, options.clients) < 1:
        raise SystemExit("error: --sandboxes and --clients must be 1 or more")
    if min(options.execs, options.file_ops) < 0:
        raise SystemExit("error: --execs and --file-ops must be 0 or more")
    schedule = make_schedule(
        options.sandboxes, options.execs, options.file_ops, options.seed
    )
    if not schedule:
        raise SystemExit("error: --execs and --file-ops are both 0")
    load_before = load_average()
    with running_daemon(options.work_dir, "load") as (daemon, client):
        sandbox_ids, setup_seconds = set_up(
            daemon.address, options.sandboxes, options.clients
        )
        logger.info("created %d sandboxes in %.1f s", len(sandbox_ids), setup_seconds)
        try:
            results = run_schedule(
                daemon.address, sandbox_ids, schedule, options.clients
            )
        finally:
            for sandbox_id in sandbox_ids:
                terminate(client, sandbox_id)
    results.setup_seconds = setup_seconds
    markdown = (
        header("benchmarks.load", arguments, load_before)
        + "\n"
        + render(results, options.sandboxes, schedule, options.clients)
    )
    write_section(
        Path(options.docs), SECTION_START, SECTION_END, markdown, options.update_docs
    )
    return 1 if results.error_counts else 0


if __name__ == "__main__":
    sys.exit(main())
