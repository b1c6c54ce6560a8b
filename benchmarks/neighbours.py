"""`python -m benchmarks.neighbours`: exec latency beside CPU-bound neighbours.

    sudo .venv/bin/python -m benchmarks.neighbours --update-docs

Through a real `engine serve` daemon, it times execs of `true` in a victim
sandbox, alternating between idle phases and loaded phases in which each of
``--neighbours`` other sandboxes runs one busy loop per host core (the CPU
spin of benchmarks.exhaustion). Every sandbox has the benchmarks' limits (1
core, 512 MiB, 512 pids, loopback only). The report compares the victim's
median exec round trip while loaded with its idle median of the same run,
and gives the CPU time the neighbours used, which shows that the load was on.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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
from benchmarks.exhaustion import busy_loops_argv
from benchmarks.report import percentile
from engine.sdk.client import Client
from engine.sdk.sandbox import SandboxProcess, SandboxProcessManager
from engine.v1 import sandbox_pb2 as pb

logger = logging.getLogger(__name__)

SECTION_START = "<!-- neighbours:start -->"
SECTION_END = "<!-- neighbours:end -->"
# Target: the loaded median at most this many times the idle median.
TARGET_RATIO = 3.0
# Seconds a killed busy loop may take to be reported as exited.
STOP_TIMEOUT = 30.0


@dataclass
class Phases:
    """Victim round trips in seconds, idle and loaded, and the neighbours' CPU."""

    idle: list[float] = field(default_factory=list)
    loaded: list[float] = field(default_factory=list)
    loaded_seconds: float = 0.0
    neighbour_cpu_seconds: float = 0.0


def _cpu_seconds(client: Client, sandbox_ids: list[str]) -> float:
    return sum(
        client.call("Stats", pb.StatsRequest(sandbox_id=sandbox_id)).cpu_seconds
        for sandbox_id in sandbox_ids
    )


def _time_execs(client: Client, sandbox_id: str, count: int) -> list[float]:
    values = []
    for _ in range(count):
        begin = time.perf_counter()
        run_to_exit(client, sandbox_id, TRUE_ARGV)
        values.append(time.perf_counter() - begin)
    return values


def measure(
    client: Client, neighbours: int, rounds: int, samples: int, ramp: float
) -> Phases:
    """Alternate idle and loaded phases of ``samples`` victim execs each."""
    phases = Phases()
    victim = create(client, spec_proto())
    spinners = [create(client, spec_proto()) for _ in range(neighbours)]
    loops = os.cpu_count() or 1
    try:
        _time_execs(client, victim, 3)
        for number in range(rounds):
            phases.idle += _time_execs(client, victim, samples)
            cpu_before = _cpu_seconds(client, spinners)
            started = time.perf_counter()
            running: list[SandboxProcess] = [
                SandboxProcessManager(client, sandbox_id).exec(busy_loops_argv(loops))
                for sandbox_id in spinners
            ]
            try:
                time.sleep(ramp)
                phases.loaded += _time_execs(client, victim, samples)
            finally:
                for process in running:
                    process.kill()
                for process in running:
                    process.wait(STOP_TIMEOUT)
            phases.loaded_seconds += time.perf_counter() - started
            phases.neighbour_cpu_seconds += _cpu_seconds(client, spinners) - cpu_before
            logger.info("round %d of %d done", number + 1, rounds)
            # The killed loops' exits and the cgroups' throttling settle.
            time.sleep(ramp)
    finally:
        for sandbox_id in [victim, *spinners]:
            terminate(client, sandbox_id)
    return phases


def _ms(values: list[float], fraction: float) -> str:
    return f"{percentile(values, fraction) * 1000:.2f}"


def render(phases: Phases, neighbours: int, rounds: int, samples: int) -> str:
    idle = statistics.median(phases.idle)
    loaded = statistics.median(phases.loaded)
    ratio = loaded / idle
    loops = os.cpu_count() or 1
    cores = phases.neighbour_cpu_seconds / phases.loaded_seconds
    verdict = "met" if ratio <= TARGET_RATIO else "**missed**"
    return (
        "\n".join(
            [
                f"{rounds} rounds, each {samples} execs of `true` in the victim while"
                f" idle, then {samples} while {neighbours} other sandboxes each run"
                f" {loops} busy loops (one per host core). During the loaded phases"
                f" the neighbours used {cores:.2f} cores on average.",
                "",
                "| victim exec round trip | execs | p50 (ms) | p99 (ms) | max (ms) |",
                "|---|---:|---:|---:|---:|",
                f"| idle | {len(phases.idle)} | {idle * 1000:.2f}"
                f" | {_ms(phases.idle, 0.99)} | {max(phases.idle) * 1000:.2f} |",
                f"| {neighbours} busy neighbours | {len(phases.loaded)}"
                f" | {loaded * 1000:.2f} | {_ms(phases.loaded, 0.99)}"
                f" | {max(phases.loaded) * 1000:.2f} |",
                "",
                f"- p50 with busy neighbours ≤ {TARGET_RATIO:g}x the idle p50:"
                f" {verdict} ({ratio:.2f}x).",
            ]
        )
        + "\n"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.neighbours",
        description="Time execs in one sandbox of an engine daemon while other"
        " sandboxes spin on every host core, against its idle latency in the"
        " same run. Needs root.",
    )
    parser.add_argument(
        "--neighbours",
        type=int,
        default=4,
        metavar="N",
        help="sandboxes that run the busy loops (default: 4)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        metavar="N",
        help="idle plus loaded phases (default: 5)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=30,
        metavar="N",
        help="victim execs per phase (default: 30)",
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="wait after starting the loops, and after stopping them, before"
        " the next phase (default: 1.0)",
    )
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    options = build_parser().parse_args(arguments)
    configure_logging(options.log_level)
    check_root()
    if min(options.neighbours, options.rounds, options.samples) < 1:
        raise SystemExit(
            "error: --neighbours, --rounds and --samples must be 1 or more"
        )
    load_before = load_average()
    with running_daemon(options.work_dir, "neighbours") as (_, client):
        phases = measure(
            client, options.neighbours, options.rounds, options.samples, options.ramp
        )
    markdown = (
        header("benchmarks.neighbours", arguments, load_before)
        + "\n"
        + render(phases, options.neighbours, options.rounds, options.samples)
    )
    write_section(
        Path(options.docs), SECTION_START, SECTION_END, markdown, options.update_docs
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
