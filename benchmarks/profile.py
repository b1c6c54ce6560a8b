"""`python -m benchmarks.profile`: a profile of the sandbox creation path.

    sudo .venv/bin/python -m benchmarks.profile --update-docs

For each ``--warm-pool`` size it starts a real `engine serve` daemon with
that pool. One client in this process then runs cycles of a Create, an Exec
of `true` read to its exit event and a Terminate, in three kinds of loop.
The first runs without a profiler. In the second, one py-spy process
samples the daemon and another the zygote. In the third, one ``py-spy
--subprocesses`` samples the zygote and its forked children, the
supervisors. That py-spy polls for new children and attaches to each. This
costs it far more CPU time than the other two together and slows the
cycles, so only the supervisors' tables come from the third kind of loop,
and the daemon's and the zygote's from the second. The three kinds take
turns in ``--rounds`` rounds, so that a change of the machine's load falls
on all three.

The report gives each kind of loop's phase times, the CPU time per cycle of
each process (psutil, including py-spy's), and per process kind the
functions with the most samples (benchmarks.stacks).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks import footprint
from benchmarks.daemonrun import (
    LOG_DIR,
    add_common_arguments,
    check_root,
    configure_logging,
    header,
    load_average,
    running_daemon,
    write_section,
)
from benchmarks.engines import TRUE_ARGV, create, run_to_exit, spec_proto, terminate
from benchmarks.pyspy import Target, find_py_spy, read_summary, record_command
from benchmarks.pyspy import recording as py_spy_recording
from benchmarks.report import percentile
from benchmarks.stacks import (
    DAEMON,
    KINDS,
    SUPERVISOR,
    ZYGOTE,
    ZYGOTE_MODULE,
    Frame,
    KindProfile,
    aggregate,
)
from engine.sdk.client import Client

# Under `python -m`, __name__ is "__main__", a logger that configure_logging
# leaves at WARNING, so the name is spelled out.
logger = logging.getLogger("benchmarks.profile")

SECTION_START = "<!-- profile:begin -->"
SECTION_END = "<!-- profile:end -->"
DEFAULT_POOLS = (4, 0)
# Seconds between py-spy's start and the first profiled cycle, so that it
# has found the daemon's running children.
SPY_SETTLE = 1.0
# Processes whose CPU time the report gives, in its order.
DAEMON_CPU = "daemon"
ZYGOTE_CPU = "zygote"
REAPED_CPU = "zygote's reaped children"
CLIENT_CPU = "client (this process)"
SPY_CPU = "py-spy"
# The three kinds of loop, by their names in the report.
UNPROFILED = "no profiler"
SPLIT = "py-spy on daemon and zygote"
TREE = "py-spy --subprocesses on zygote"
LOOPS = (UNPROFILED, SPLIT, TREE)
# Parts of the names of the files in LOG_DIR that keep py-spy's stacks.
FILE_NAMES = {SPLIT: "split", TREE: "subprocesses"}


@dataclass
class Sampling:
    """The samples that py-spy recorded in the loops of one kind."""

    profiles: dict[str, KindProfile] = field(default_factory=dict)
    samples: int = 0
    errors: int = 0
    # The largest "N s behind in sampling" that py-spy reported, in seconds.
    max_lag_seconds: float = 0.0


@dataclass
class Loop:
    """The cycles of one kind of loop, summed over the rounds."""

    create: list[float] = field(default_factory=list)
    exec: list[float] = field(default_factory=list)
    terminate: list[float] = field(default_factory=list)
    # CPU seconds (user plus system) by process, over all the cycles.
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    # Wall seconds of the loops, pauses included.
    wall_seconds: float = 0.0
    sampling: Sampling = field(default_factory=Sampling)

    @property
    def cycle(self) -> list[float]:
        """Return the wall seconds of each whole cycle."""
        phases = zip(self.create, self.exec, self.terminate, strict=True)
        return [create + run + end for create, run, end in phases]

    def cpu_per_cycle(self, name: str) -> float | None:
        """Return the CPU seconds per cycle of process ``name``, if measured."""
        if name not in self.cpu_seconds or not self.create:
            return None
        return self.cpu_seconds[name] / len(self.create)


@dataclass
class PoolRun:
    """The loops of one daemon with ``--warm-pool pool``, by kind of loop."""

    pool: int
    loops: dict[str, Loop] = field(
        default_factory=lambda: {kind: Loop() for kind in LOOPS}
    )


@dataclass(frozen=True)
class RunningDaemon:
    """The processes of one profiled daemon and the client that drives it."""

    client: Client
    daemon_pid: int
    zygote_pid: int
    # Temporary directory for py-spy's output, removed with the daemon.
    directory: Path


def zygote_of(daemon_pid: int) -> psutil.Process:
    """Return the daemon's zygote process."""
    for child in psutil.Process(daemon_pid).children():
        with contextlib.suppress(psutil.Error):
            if ZYGOTE_MODULE in " ".join(child.cmdline()):
                return child
    raise RuntimeError(f"engine daemon {daemon_pid} has no zygote")


class CpuMeter:
    """CPU seconds (user plus system) of the processes of one loop."""

    def __init__(
        self, daemon_pid: int, samplers: Sequence[psutil.Process] = ()
    ) -> None:
        self.daemon = psutil.Process(daemon_pid)
        self.zygote = zygote_of(daemon_pid)
        self.client = psutil.Process()
        self.samplers = samplers

    def read(self) -> dict[str, float]:
        # A child's times reach the zygote's children_* fields when the
        # zygote reaps it, and include the children that child reaped.
        zygote = self.zygote.cpu_times()
        readings = {
            DAEMON_CPU: _busy(self.daemon),
            ZYGOTE_CPU: zygote.user + zygote.system,
            REAPED_CPU: zygote.children_user + zygote.children_system,
            CLIENT_CPU: _busy(self.client),
        }
        if self.samplers:
            readings[SPY_CPU] = sum(_busy(sampler) for sampler in self.samplers)
        return readings


def _busy(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run_cycles(
    client: Client, count: int, pause: float, meter: CpuMeter, loop: Loop
) -> None:
    """Run ``count`` cycles of Create, Exec of `true` and Terminate into ``loop``."""
    before = meter.read()
    started = time.perf_counter()
    for _ in range(count):
        begin = time.perf_counter()
        sandbox_id = create(client, spec_proto())
        created = time.perf_counter()
        try:
            run_to_exit(client, sandbox_id, TRUE_ARGV)
            ran = time.perf_counter()
        finally:
            terminate(client, sandbox_id)
        ended = time.perf_counter()
        loop.create.append(created - begin)
        loop.exec.append(ran - created)
        loop.terminate.append(ended - ran)
        time.sleep(pause)
    loop.wall_seconds += time.perf_counter() - started
    after = meter.read()
    for name, value in after.items():
        loop.cpu_seconds[name] = loop.cpu_seconds.get(name, 0.0) + value - before[name]


def spy_targets(kind: str, daemon: RunningDaemon) -> list[Target]:
    """Return what py-spy records in a loop of ``kind``: SPLIT or TREE."""
    if kind == SPLIT:
        return [
            Target(DAEMON, daemon.daemon_pid, subprocesses=False),
            Target(ZYGOTE, daemon.zygote_pid, subprocesses=False),
        ]
    return [Target(ZYGOTE, daemon.zygote_pid, subprocesses=True)]


def profiled_cycles(
    daemon: RunningDaemon,
    targets: list[Target],
    count: int,
    options: argparse.Namespace,
    loop: Loop,
    keep_prefix: str,
) -> None:
    """Run ``count`` cycles into ``loop`` while one py-spy per target records.

    Each py-spy's collapsed stacks are appended to
    LOG_DIR/<keep_prefix>-<kind>.txt.
    """
    outputs = [daemon.directory / f"py-spy-{target.kind}.txt" for target in targets]
    logs = [output.with_suffix(".log") for output in outputs]
    with contextlib.ExitStack() as stack:
        samplers = []
        for target, output, log in zip(targets, outputs, logs, strict=True):
            command = record_command(
                options.py_spy, target, options.rate, options.idle, output
            )
            process = stack.enter_context(py_spy_recording(command, log))
            samplers.append(psutil.Process(process.pid))
        time.sleep(SPY_SETTLE)
        meter = CpuMeter(daemon.daemon_pid, samplers)
        run_cycles(daemon.client, count, options.pause, meter, loop)
    sampling = loop.sampling
    for target, output, log in zip(targets, outputs, logs, strict=True):
        text = output.read_text()
        for kind, profile in aggregate(
            text.splitlines(), target.kind, target.pid
        ).items():
            sampling.profiles.setdefault(kind, KindProfile()).add(profile)
        summary = read_summary(log)
        sampling.samples += summary.samples
        sampling.errors += summary.errors
        sampling.max_lag_seconds = max(
            sampling.max_lag_seconds, summary.max_lag_seconds
        )
        _keep(text, LOG_DIR / f"{keep_prefix}-{target.kind}.txt")


def _keep(text: str, target: Path) -> None:
    try:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as kept:
            kept.write(text)
    except OSError as error:
        logger.warning("failed to write py-spy's stacks to %s: %s", target, error)


def run_round(
    daemon: RunningDaemon,
    run: PoolRun,
    order: list[str],
    count: int,
    options: argparse.Namespace,
    keep_prefix: str,
) -> None:
    """Run ``count`` cycles of each kind of loop, in ``order``."""
    for kind in order:
        # Each loop starts with the pools refilled and no setup under way.
        footprint.settle(daemon.daemon_pid)
        loop = run.loops[kind]
        if kind == UNPROFILED:
            meter = CpuMeter(daemon.daemon_pid)
            run_cycles(daemon.client, count, options.pause, meter, loop)
        else:
            targets = spy_targets(kind, daemon)
            prefix = f"{keep_prefix}-{FILE_NAMES[kind]}"
            profiled_cycles(daemon, targets, count, options, loop, prefix)


def profile_pool(pool: int, options: argparse.Namespace) -> PoolRun:
    """Start a daemon with ``--warm-pool pool``, run every round, stop it."""
    name = f"profile-warm-pool-{pool}"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run = PoolRun(pool)
    extra = ("--warm-pool", str(pool))
    with running_daemon(options.work_dir, name, extra) as (daemon, client):
        assert daemon.process is not None
        daemon_pid = daemon.process.pid
        running = RunningDaemon(
            client, daemon_pid, zygote_of(daemon_pid).pid, daemon.directory.parent
        )
        # The first create also builds the host image.
        for _ in range(options.warmup):
            terminate(client, create(client, spec_proto()))
            time.sleep(options.pause)
        for number in range(options.rounds):
            # Rotate the order, so that no kind of loop always comes first.
            shift = number % len(LOOPS)
            order = [*LOOPS[shift:], *LOOPS[:shift]]
            count = _share(options.cycles, options.rounds, number)
            run_round(running, run, order, count, options, f"{name}-{stamp}")
            logger.info(
                "warm pool %d: round %d of %d done", pool, number + 1, options.rounds
            )
    logger.info("py-spy's collapsed stacks: %s/%s-%s-*.txt", LOG_DIR, name, stamp)
    return run


def _share(total: int, parts: int, index: int) -> int:
    """Return part ``index`` of ``total`` split into ``parts`` near-equal parts."""
    return total // parts + (1 if index < total % parts else 0)


def _ms(values: list[float], fraction: float) -> str:
    return f"{percentile(values, fraction) * 1000:.2f}"


def _timing_rows(runs: list[PoolRun]) -> list[str]:
    columns = [(run.pool, kind, run.loops[kind]) for run in runs for kind in LOOPS]
    lines = [
        "| per cycle | "
        + " | ".join(f"pool {pool}, {kind}" for pool, kind, _ in columns)
        + " |",
        "|---|" + "---:|" * len(columns),
    ]
    phases = [
        ("create, p50 (ms)", lambda loop: _ms(loop.create, 0.5)),
        ("exec `true`, p50 (ms)", lambda loop: _ms(loop.exec, 0.5)),
        ("terminate, p50 (ms)", lambda loop: _ms(loop.terminate, 0.5)),
        ("whole cycle, p50 (ms)", lambda loop: _ms(loop.cycle, 0.5)),
        ("whole cycle, p95 (ms)", lambda loop: _ms(loop.cycle, 0.95)),
    ]
    for title, cell in phases:
        cells = [cell(loop) for _, _, loop in columns]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    for name in (DAEMON_CPU, ZYGOTE_CPU, REAPED_CPU, CLIENT_CPU, SPY_CPU):
        cells = []
        for _, _, loop in columns:
            value = loop.cpu_per_cycle(name)
            cells.append("" if value is None else f"{value * 1000:.2f}")
        lines.append(f"| CPU of {name} (ms) | " + " | ".join(cells) + " |")
    return lines


def _sample_rows(runs: list[PoolRun]) -> list[str]:
    lines = [
        "| process kind | loop | "
        + " | ".join(f"pool {run.pool}: samples, processes" for run in runs)
        + " |",
        "|---|---|" + "---:|" * len(runs),
    ]
    for loop_kind in (SPLIT, TREE):
        for kind in KINDS:
            profiles = [
                run.loops[loop_kind].sampling.profiles.get(kind) for run in runs
            ]
            if all(profile is None for profile in profiles):
                continue
            cells = [
                "0" if profile is None else f"{profile.samples}, {len(profile.pids)}"
                for profile in profiles
            ]
            lines.append(f"| {kind} | {loop_kind} | " + " | ".join(cells) + " |")
    return lines


def _function_table(
    rows: list[tuple[Frame, float, float]], first: str, second: str
) -> list[str]:
    lines = [
        f"| function | defined at | {first} | {second} |",
        "|---|---|---:|---:|",
    ]
    for frame, share, other in rows:
        lines.append(
            f"| `{frame.function}` | `{frame.location}` | {share:.1f}% | {other:.1f}% |"
        )
    return [*lines, ""]


def _function_tables(run: PoolRun, top: int) -> list[str]:
    lines = []
    for kind, loop_kind in ((DAEMON, SPLIT), (ZYGOTE, SPLIT), (SUPERVISOR, TREE)):
        profile = run.loops[loop_kind].sampling.profiles.get(kind)
        if profile is None:
            continue
        lines += [
            f"#### Pool {run.pool}: {kind}, {profile.samples} samples ({loop_kind})",
            "",
            "By inclusive samples:",
            "",
            *_function_table(profile.top_inclusive(top), "inclusive", "self"),
            "By self samples:",
            "",
            *_function_table(profile.top_self(top), "self", "inclusive"),
        ]
    return lines


def _run_sentence(run: PoolRun) -> str:
    walls = ", ".join(
        f"{run.loops[kind].wall_seconds:.1f} s ({kind})" for kind in LOOPS
    )
    samplers = "; ".join(
        f"{kind}: {run.loops[kind].sampling.samples} samples,"
        f" {run.loops[kind].sampling.errors} errors, at most"
        f" {run.loops[kind].sampling.max_lag_seconds:.2f} s behind its schedule"
        for kind in (SPLIT, TREE)
    )
    return f"Pool {run.pool}: wall time {walls}. py-spy reported {samplers}."


def render(runs: list[PoolRun], options: argparse.Namespace) -> str:
    """Return the report: timings and CPU per cycle, samples, top functions."""
    idle = " --idle" if options.idle else ""
    lines = [
        f"Per daemon: {options.warmup} warm-up cycles, then {options.rounds}"
        f" rounds in which each kind of loop runs a share of its {options.cycles}"
        f" cycles, each cycle followed by a {options.pause:g} s pause. py-spy"
        f" ran as `py-spy record --function --nonblocking --rate"
        f" {options.rate}{idle}`. " + " ".join(_run_sentence(run) for run in runs),
        "",
        *_timing_rows(runs),
        "",
        *_sample_rows(runs),
        "",
    ]
    for run in runs:
        lines += _function_tables(run, options.top)
    return "\n".join(lines).rstrip("\n") + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile",
        description="Profile the create, exec and terminate cycle of an engine"
        " daemon with py-spy, across the daemon, its zygote and the supervisors."
        " Needs root.",
    )
    parser.add_argument(
        "--cycles",
        type=int,
        default=200,
        metavar="N",
        help="cycles of each kind of loop (no profiler, py-spy on the daemon"
        " and the zygote, py-spy --subprocesses) per pool size (default: 200)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        metavar="N",
        help="rounds that the cycles are split into; each round runs the three"
        " kinds of loop in turn (default: 4)",
    )
    parser.add_argument(
        "--warm-pool",
        type=int,
        action="append",
        metavar="N",
        help="the daemon's --warm-pool size; repeat it for one daemon per size"
        " (default: 4, then 0)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        metavar="N",
        help="untimed cycles before the loops (default: 5)",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="sleep after each cycle, in which the warm pool refills (default: 0.25)",
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=500,
        metavar="HZ",
        help="samples per second of each py-spy process (default: 500)",
    )
    parser.add_argument(
        "--idle",
        action="store_true",
        help="pass --idle to py-spy, so that waiting threads are sampled too",
    )
    parser.add_argument(
        "--top",
        type=int,
        default=8,
        metavar="N",
        help="functions per table (default: 8)",
    )
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    options = build_parser().parse_args(arguments)
    configure_logging(options.log_level)
    if min(options.cycles, options.rounds, options.rate, options.top) < 1:
        raise SystemExit(
            "error: --cycles, --rounds, --rate and --top must be 1 or more"
        )
    if options.rounds > options.cycles:
        raise SystemExit(
            f"error: --rounds {options.rounds} is more than --cycles"
            f" {options.cycles}; each round needs a cycle of each kind of loop"
        )
    if options.warm_pool is None:
        options.warm_pool = list(DEFAULT_POOLS)
    if min(options.warmup, options.pause, *options.warm_pool) < 0:
        raise SystemExit("error: --warmup, --pause and --warm-pool must be 0 or more")
    options.py_spy = find_py_spy()
    check_root()
    load_before = load_average()
    runs = [profile_pool(pool, options) for pool in options.warm_pool]
    markdown = (
        header("benchmarks.profile", arguments, load_before)
        + "\n"
        + render(runs, options)
    )
    write_section(
        Path(options.docs), SECTION_START, SECTION_END, markdown, options.update_docs
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
