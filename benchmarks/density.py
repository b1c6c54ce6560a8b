"""`python -m benchmarks.density`: many idle sandboxes alive at once in one daemon.

    sudo .venv/bin/python -m benchmarks.density --sandboxes 1000 --update-docs

It creates ``--sandboxes`` idle sandboxes through gRPC with ``--clients``
threads, then runs `true` once in every one of them, one after another, and
terminates them all. It reports the time to create them, the exec round
trip across them (median, p99), and the memory they hold: the engine's
footprint (benchmarks.footprint) and the drop of MemAvailable, which also
catches kernel memory outside the sandboxes' cgroups. The first failure
stops the creates, and the report gives it with the count reached.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import footprint
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
from benchmarks.footprint import MIB, Footprint
from benchmarks.report import percentile
from engine.sdk.client import Client

logger = logging.getLogger(__name__)

SECTION_START = "<!-- density:start -->"
SECTION_END = "<!-- density:end -->"
# Target: the whole run's memory must fit the machine, in GiB.
TARGET_GIB = 24.0
# Seconds the footprint may take to settle after the creates.
SETTLE_TIMEOUT = 120.0


@dataclass
class Outcome:
    """Figures of one density run, and the failures of each phase."""

    wanted: int
    created: list[str] = field(default_factory=list)
    create_seconds: list[float] = field(default_factory=list)
    create_wall_seconds: float = 0.0
    create_error: str = ""
    exec_seconds: list[float] = field(default_factory=list)
    exec_errors: list[str] = field(default_factory=list)
    terminate_wall_seconds: float = 0.0
    terminate_errors: list[str] = field(default_factory=list)
    before: Footprint | None = None
    after: Footprint | None = None
    available_drop_bytes: int = 0
    daemon_nofile: str = ""


def _limit(pid: int, name: str) -> str:
    """Return the soft and hard value of one /proc/PID/limits line."""
    try:
        with open(f"/proc/{pid}/limits") as file:
            for line in file:
                if line.startswith(name):
                    fields = line[len(name) :].split()
                    return f"{fields[0]} soft, {fields[1]} hard"
    except OSError:
        pass
    return "unknown"


def create_all(address: str, count: int, clients: int, outcome: Outcome) -> None:
    """Create ``count`` sandboxes with ``clients`` threads; stop at the first error."""
    lock = threading.Lock()
    failed = threading.Event()
    remaining = [count]

    def worker() -> None:
        with Client(address) as client:
            while not failed.is_set():
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                begin = time.perf_counter()
                try:
                    sandbox_id = create(client, spec_proto(block_network=True, ttl=0))
                except Exception as error:
                    with lock:
                        if not outcome.create_error:
                            outcome.create_error = (
                                f"a create failed after {len(outcome.created)}"
                                f" succeeded: {type(error).__name__}: {error}"
                            )
                    failed.set()
                    return
                elapsed = time.perf_counter() - begin
                with lock:
                    outcome.created.append(sandbox_id)
                    outcome.create_seconds.append(elapsed)
                    done = len(outcome.created)
                if done % 100 == 0:
                    logger.info("%d sandboxes created", done)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as executor:
        for future in [executor.submit(worker) for _ in range(clients)]:
            future.result()
    outcome.create_wall_seconds = time.perf_counter() - started


def exec_each(client: Client, outcome: Outcome) -> None:
    """Run `true` once in every created sandbox, one after another."""
    for sandbox_id in outcome.created:
        begin = time.perf_counter()
        try:
            run_to_exit(client, sandbox_id, TRUE_ARGV)
        except Exception as error:
            outcome.exec_errors.append(f"{sandbox_id}: {type(error).__name__}: {error}")
            continue
        outcome.exec_seconds.append(time.perf_counter() - begin)


def terminate_all(address: str, clients: int, outcome: Outcome) -> None:
    """Terminate every created sandbox with ``clients`` threads."""
    chunks = [outcome.created[index::clients] for index in range(clients)]

    def worker(sandbox_ids: list[str]) -> None:
        with Client(address) as client:
            for sandbox_id in sandbox_ids:
                try:
                    terminate(client, sandbox_id)
                except Exception as error:
                    outcome.terminate_errors.append(f"{sandbox_id}: {error}")

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as executor:
        for future in [executor.submit(worker, chunk) for chunk in chunks]:
            future.result()
    outcome.terminate_wall_seconds = time.perf_counter() - started


def run(address: str, daemon_pid: int, count: int, clients: int) -> Outcome:
    outcome = Outcome(wanted=count)
    outcome.daemon_nofile = _limit(daemon_pid, "Max open files")
    with Client(address) as client:
        # The first sandbox builds the host image and starts the pool of
        # loopback-only sandboxes, so neither lands in the figures.
        terminate(client, create(client, spec_proto(block_network=True, ttl=0)))
        outcome.before = footprint.settle(daemon_pid)
        available_before = footprint.mem_available_bytes()
        try:
            create_all(address, count, clients, outcome)
            logger.info(
                "created %d sandboxes in %.1f s%s",
                len(outcome.created),
                outcome.create_wall_seconds,
                f"; {outcome.create_error}" if outcome.create_error else "",
            )
            outcome.after = footprint.settle(daemon_pid, timeout=SETTLE_TIMEOUT)
            outcome.available_drop_bytes = (
                available_before - footprint.mem_available_bytes()
            )
            exec_each(client, outcome)
            logger.info(
                "ran true in %d sandboxes, %d failed",
                len(outcome.exec_seconds),
                len(outcome.exec_errors),
            )
        finally:
            terminate_all(address, clients, outcome)
            logger.info(
                "terminated %d sandboxes in %.1f s",
                len(outcome.created),
                outcome.terminate_wall_seconds,
            )
    return outcome


def _ms(values: list[float], fraction: float | None = None) -> str:
    if not values:
        return "-"
    if fraction is None:
        return f"{statistics.median(values) * 1000:.1f}"
    return f"{percentile(values, fraction) * 1000:.1f}"


def _footprint_rows(outcome: Outcome) -> list[str]:
    before, after = outcome.before, outcome.after
    if before is None or after is None:
        return []
    created = len(outcome.created)
    added = after.total_bytes - before.total_bytes
    per_sandbox = added / created / MIB if created else 0.0
    added_uss = (after.uss_bytes - before.uss_bytes) / MIB
    added_kmem = (after.kmem_bytes - before.kmem_bytes) / MIB
    return [
        f"| engine footprint added (USS + kmem) | {added / MIB:.0f} MiB"
        f" ({per_sandbox:.2f} MiB per sandbox) |",
        f"| of which USS / kmem | {added_uss:.0f} MiB / {added_kmem:.0f} MiB |",
        f"| engine footprint in all | {after.total_bytes / MIB:.0f} MiB |",
        f"| drop of MemAvailable | {outcome.available_drop_bytes / MIB:.0f} MiB |",
        f"| engine processes | {before.processes} before, {after.processes} after |",
        f"| open descriptors of the daemon | {before.daemon_fds} before,"
        f" {after.daemon_fds} after |",
        f"| most open descriptors of one descendant | "
        f"{before.max_descendant_fds} before, {after.max_descendant_fds} after |",
    ]


def _failure_lines(outcome: Outcome) -> list[str]:
    failures = []
    if outcome.create_error:
        failures.append(f"- creates stopped: {outcome.create_error}")
    failures += [f"- exec failed: {error}" for error in outcome.exec_errors[:5]]
    failures += [
        f"- terminate failed: {error}" for error in outcome.terminate_errors[:5]
    ]
    if not failures:
        return []
    return ["Failures (the first five of each kind):", "", *failures, ""]


def render(outcome: Outcome, clients: int) -> str:
    created = len(outcome.created)
    lines = [
        f"Created {created} of {outcome.wanted} sandboxes with {clients} client"
        f" threads; the daemon's RLIMIT_NOFILE was {outcome.daemon_nofile}.",
        "",
        "| measurement | value |",
        "|---|---:|",
        f"| time to create all | {outcome.create_wall_seconds:.1f} s |",
        f"| create, median / p99 | {_ms(outcome.create_seconds)} ms /"
        f" {_ms(outcome.create_seconds, 0.99)} ms |",
        f"| exec of `true` in each, one after another: median / p99"
        f" | {_ms(outcome.exec_seconds)} ms / {_ms(outcome.exec_seconds, 0.99)} ms |",
        f"| execs that failed | {len(outcome.exec_errors)} |",
        f"| time to terminate all | {outcome.terminate_wall_seconds:.1f} s |",
        *_footprint_rows(outcome),
        "",
        *_failure_lines(outcome),
    ]
    if outcome.after is not None:
        used = max(outcome.after.total_bytes, outcome.available_drop_bytes)
        used_gib = used / 1024**3
        fits = created == outcome.wanted and used_gib <= TARGET_GIB
        verdict = "met" if fits and not outcome.exec_errors else "**missed**"
        lines.append(
            f"- {outcome.wanted} idle sandboxes, each answering an exec, within"
            f" {TARGET_GIB:g} GiB: {verdict} ({created} created,"
            f" {len(outcome.exec_seconds)} answered, {used_gib:.1f} GiB)."
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.density",
        description="Create many idle sandboxes in one engine daemon, run `true`"
        " in each, and report the memory, the create time and the exec latency."
        " Needs root.",
    )
    parser.add_argument(
        "--sandboxes",
        type=int,
        default=1000,
        metavar="N",
        help="idle sandboxes to keep alive at once (default: 1000)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=4,
        metavar="N",
        help="client threads, each with its own channel, that create and"
        " terminate the sandboxes (default: 4)",
    )
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    options = build_parser().parse_args(arguments)
    configure_logging(options.log_level)
    check_root()
    if options.sandboxes < 1 or options.clients < 1:
        raise SystemExit("error: --sandboxes and --clients must be 1 or more")
    load_before = load_average()
    with running_daemon(options.work_dir, "density") as (daemon, _):
        assert daemon.process is not None
        outcome = run(
            daemon.address, daemon.process.pid, options.sandboxes, options.clients
        )
    markdown = (
        header("benchmarks.density", arguments, load_before)
        + "\n"
        + render(outcome, options.clients)
    )
    write_section(
        Path(options.docs), SECTION_START, SECTION_END, markdown, options.update_docs
    )
    failed = outcome.create_error or outcome.exec_errors or outcome.terminate_errors
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
