"""`python -m benchmarks.memory`: host memory per idle sandbox, as a slope over N.

    sudo .venv/bin/python -m benchmarks.memory --update-docs

Against a real `engine serve` daemon, it reads the USS of the daemon and of
every descendant process, plus the kernel memory of every memory cgroup
those processes run in. It does so at several counts of idle sandboxes and
reports the least-squares slope per sandbox. It assumes nothing about which
processes the engine runs per sandbox. Pre-made (pooled) sandboxes count too, so each
reading is taken with the pool as full as at the start (see ``fill_pool``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from dataclasses import dataclass
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
from engine.sdk.client import Client

logger = logging.getLogger(__name__)

SECTION_START = "<!-- memory:start -->"
SECTION_END = "<!-- memory:end -->"
# Target: host memory per idle sandbox, in MiB.
TARGET_MIB = 2.0
DEFAULT_POINTS = (0, 50, 100)


@dataclass(frozen=True)
class Point:
    """The reading at one count of idle sandboxes."""

    sandboxes: int
    # Cgroups holding engine processes beyond the sandboxes: pre-made ones.
    premade: int
    reading: Footprint
    # Create plus terminate cycles that were needed to refill the pool.
    refills: int


def idle_spec():
    """Return the spec of the measured sandboxes: loopback only, no idle timeout."""
    return spec_proto(block_network=True, ttl=0)


def fill_pool(
    client: Client, daemon_pid: int, live: int, premade: int | None, max_cycles: int
) -> tuple[Footprint, int]:
    """Settle, then create and terminate sandboxes until ``premade`` are ready again.

    The pool refills in bursts once it is half empty, so after N creates it
    may hold fewer pre-made sandboxes than at the start. Each create takes
    one, and a refill then fills it up. With ``premade`` None it only settles.
    Returns the settled reading and the number of cycles run.
    """
    reading = footprint.settle(daemon_pid)
    cycles = 0
    while premade is not None and reading.cgroups - live < premade:
        if cycles >= max_cycles:
            logger.warning(
                "the pool contains %d pre-made sandboxes after %d refill cycles,"
                " not %d as at the start",
                reading.cgroups - live,
                cycles,
                premade,
            )
            break
        terminate(client, create(client, idle_spec()))
        cycles += 1
        reading = footprint.settle(daemon_pid)
    return reading, cycles


def measure(
    client: Client, daemon_pid: int, points: list[int], readings: int
) -> list[Point]:
    """Create idle sandboxes up to each count in ``points`` and read the footprint.

    Every sandbox runs `true` once after its creation and then stays idle.
    """
    # The first sandbox builds the host image and starts the pool of
    # loopback-only sandboxes, so neither lands in a reading.
    terminate(client, create(client, idle_spec()))
    baseline, _ = fill_pool(client, daemon_pid, 0, None, 0)
    premade = baseline.cgroups
    logger.info("the pool contains %d pre-made sandboxes", premade)
    sandbox_ids: list[str] = []
    results = []
    for count in points:
        while len(sandbox_ids) < count:
            sandbox_id = create(client, idle_spec())
            sandbox_ids.append(sandbox_id)
            run_to_exit(client, sandbox_id, TRUE_ARGV)
        _, refills = fill_pool(
            client, daemon_pid, len(sandbox_ids), premade, max_cycles=4 * premade + 4
        )
        reading = footprint.median_reading(daemon_pid, readings, interval=0.5)
        results.append(
            Point(count, reading.cgroups - count, reading, refills),
        )
        logger.info(
            "%d sandboxes: %.1f MiB (USS %.1f, kmem %.1f), %d processes",
            count,
            reading.total_bytes / MIB,
            reading.uss_bytes / MIB,
            reading.kmem_bytes / MIB,
            reading.processes,
        )
    started = time.perf_counter()
    for sandbox_id in sandbox_ids:
        terminate(client, sandbox_id)
    logger.info(
        "terminated %d sandboxes in %.1f s",
        len(sandbox_ids),
        time.perf_counter() - started,
    )
    return results


def _mib(value: float) -> str:
    return f"{value / MIB:.2f}"


def render(points: list[Point], readings: int) -> str:
    """Return the table of readings and the slope per sandbox."""
    lines = [
        f"Each row is the median of {readings} readings, taken after the"
        " process and cgroup counts held still for 2 s and the pool was"
        " refilled.",
        "",
        "| idle sandboxes | pre-made (pool) | engine processes | cgroups"
        " | USS (MiB) | kmem (MiB) | total (MiB) | daemon fds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        reading = point.reading
        lines.append(
            f"| {point.sandboxes} | {point.premade} | {reading.processes}"
            f" | {reading.cgroups} | {_mib(reading.uss_bytes)}"
            f" | {_mib(reading.kmem_bytes)} | {_mib(reading.total_bytes)}"
            f" | {reading.daemon_fds} |"
        )
    lines.append("")
    counts = {point.sandboxes for point in points}
    if len(counts) < 2:
        lines.append("A slope needs readings at two or more sandbox counts.")
        return "\n".join(lines) + "\n"

    def per_sandbox(field: str) -> float:
        return footprint.slope(
            [(point.sandboxes, getattr(point.reading, field)) for point in points]
        )

    total = per_sandbox("total_bytes") / MIB
    uss = per_sandbox("uss_bytes") / MIB
    kmem = per_sandbox("kmem_bytes") / MIB
    processes = per_sandbox("processes")
    verdict = "met" if total <= TARGET_MIB else "**missed**"
    steps = []
    for first, second in itertools.pairwise(points):
        if second.sandboxes == first.sandboxes:
            continue
        added = second.reading.total_bytes - first.reading.total_bytes
        step = added / MIB / (second.sandboxes - first.sandboxes)
        steps.append(f"{first.sandboxes} to {second.sandboxes}: {step:.2f}")
    lines += [
        "| per idle sandbox (least-squares slope) | value |",
        "|---|---:|",
        f"| total host memory | {total:.2f} MiB |",
        f"| USS of engine processes | {uss:.2f} MiB |",
        f"| kernel memory of its cgroup | {kmem:.2f} MiB |",
        f"| engine processes | {processes:.2f} |",
        "",
        f"Slope between consecutive counts, MiB per sandbox: {'; '.join(steps)}.",
        "",
        f"- host memory per idle sandbox ≤ {TARGET_MIB:g} MiB: {verdict}"
        f" ({total:.2f} MiB).",
    ]
    return "\n".join(lines) + "\n"


def _points(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid counts {text!r}: expected integers separated by commas,"
            " such as 0,50,100"
        ) from None
    if min(values) < 0 or values != sorted(values):
        raise argparse.ArgumentTypeError(
            f"invalid counts {text!r}: expected ascending counts of 0 or more"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description="Measure the host memory per idle sandbox of a real engine"
        " daemon: USS of its processes plus its cgroups' kernel memory, at"
        " several sandbox counts. Needs root.",
    )
    parser.add_argument(
        "--points",
        type=_points,
        default=list(DEFAULT_POINTS),
        metavar="N,N,...",
        help="ascending counts of idle sandboxes to read the footprint at"
        " (default: 0,50,100)",
    )
    parser.add_argument(
        "--readings",
        type=int,
        default=5,
        metavar="N",
        help="readings per count, 0.5 s apart, of which the median is kept"
        " (default: 5)",
    )
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    options = build_parser().parse_args(arguments)
    configure_logging(options.log_level)
    check_root()
    if options.readings < 1:
        raise SystemExit(f"error: invalid --readings {options.readings}: expected 1+")
    load_before = load_average()
    with running_daemon(options.work_dir, "memory") as (daemon, client):
        assert daemon.process is not None
        points = measure(client, daemon.process.pid, options.points, options.readings)
    markdown = (
        header("benchmarks.memory", arguments, load_before)
        + "\n"
        + render(points, options.readings)
    )
    write_section(
        Path(options.docs), SECTION_START, SECTION_END, markdown, options.update_docs
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
