"""`python -m benchmarks.profile`: a profile of the sandbox creation path.

    sudo .venv/bin/python -m benchmarks.profile --update-docs

For each ``--warm-pool`` size it starts a real `engine serve` daemon with
that pool. One client in this process then runs cycles of a Create, an Exec
of `true` read to its exit event and a Terminate, in up to three kinds of
loop. The first runs without a profiler. In the second, one py-spy process
samples the daemon and another the zygote. In the third, which needs perf
and is left out with ``--no-perf``, ``perf record --all-cpus`` samples every
process of the machine. Only the samples of the zygote's descendants count:
the supervisors and PID 1s, which run engine-init, a C program without
Python frames for py-spy, and the processes in the sandboxes. The kinds of
loop take turns in ``--rounds`` rounds, so that a change of the machine's
load falls on all of them.

The report gives each kind of loop's phase times, the CPU time per cycle of
each process (psutil, including the profiler's), the functions with the
most py-spy samples in the daemon and in the zygote, and the commands and
symbols with the most perf samples in the zygote's descendants
(benchmarks.stacks).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import subprocess
import sys
import time
from collections import Counter
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
from benchmarks.pyspy import (
    Target,
    find_py_spy,
    log_tail,
    read_summary,
    record_command,
    recording,
)
from benchmarks.report import percentile
from benchmarks.stacks import (
    DAEMON,
    ZYGOTE,
    ZYGOTE_MODULE,
    Frame,
    KindProfile,
    PerfSample,
    aggregate,
    descendants,
    kernel_entry,
    kernel_stack,
    perf_samples,
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
PERF_CPU = "perf"
# The kinds of loop, by their names in the report.
UNPROFILED = "no profiler"
PYSPY = "py-spy on daemon and zygote"
PERF = "perf, all CPUs"
# The zygote's descendants, as the report names them.
CHILDREN = "zygote's descendants"
# Seconds that `perf script` may take to read one loop's recording.
PERF_SCRIPT_TIMEOUT = 300.0


@dataclass
class Sampling:
    """The samples that py-spy recorded in the loops of one kind."""

    profiles: dict[str, KindProfile] = field(default_factory=dict)
    samples: int = 0
    errors: int = 0
    # The largest "N s behind in sampling" that py-spy reported, in seconds.
    max_lag_seconds: float = 0.0


@dataclass
class PerfSampling:
    """The perf samples of the zygote's descendants in the loops of one kind."""

    children: KindProfile = field(default_factory=KindProfile)
    by_command: dict[str, KindProfile] = field(default_factory=dict)
    # Samples by stacks.kernel_entry.
    by_entry: Counter[str] = field(default_factory=Counter)
    # Samples of every process on every CPU, idle ones included.
    samples: int = 0


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
    perf: PerfSampling = field(default_factory=PerfSampling)

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
    loops: dict[str, Loop]


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
        self,
        daemon_pid: int,
        samplers: Sequence[psutil.Process] = (),
        sampler_name: str = SPY_CPU,
    ) -> None:
        self.daemon = psutil.Process(daemon_pid)
        self.zygote = zygote_of(daemon_pid)
        self.client = psutil.Process()
        self.samplers = samplers
        self.sampler_name = sampler_name

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
            readings[self.sampler_name] = sum(
                _busy(sampler) for sampler in self.samplers
            )
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


def py_spy_cycles(
    daemon: RunningDaemon,
    count: int,
    options: argparse.Namespace,
    loop: Loop,
    keep_prefix: str,
) -> None:
    """Run ``count`` cycles into ``loop`` while py-spy records daemon and zygote.

    Each py-spy's collapsed stacks are appended to
    LOG_DIR/<keep_prefix>-<kind>.txt.
    """
    targets = [
        Target(DAEMON, daemon.daemon_pid),
        Target(ZYGOTE, daemon.zygote_pid),
    ]
    outputs = [daemon.directory / f"py-spy-{target.kind}.txt" for target in targets]
    logs = [output.with_suffix(".log") for output in outputs]
    with contextlib.ExitStack() as stack:
        samplers = []
        for target, output, log in zip(targets, outputs, logs, strict=True):
            command = record_command(
                options.py_spy, target, options.rate, options.idle, output
            )
            process = stack.enter_context(recording(command, log))
            samplers.append(psutil.Process(process.pid))
        time.sleep(SPY_SETTLE)
        meter = CpuMeter(daemon.daemon_pid, samplers)
        run_cycles(daemon.client, count, options.pause, meter, loop)
    sampling = loop.sampling
    for target, output, log in zip(targets, outputs, logs, strict=True):
        text = output.read_text()
        profile = aggregate(text.splitlines(), target.pid)
        sampling.profiles.setdefault(target.kind, KindProfile()).add(profile)
        summary = read_summary(log)
        sampling.samples += summary.samples
        sampling.errors += summary.errors
        sampling.max_lag_seconds = max(
            sampling.max_lag_seconds, summary.max_lag_seconds
        )
        _keep(text, LOG_DIR / f"{keep_prefix}-{target.kind}.txt")


def perf_cycles(
    daemon: RunningDaemon,
    count: int,
    options: argparse.Namespace,
    loop: Loop,
    keep_path: Path,
) -> None:
    """Run ``count`` cycles into ``loop`` while perf samples every CPU.

    The collapsed stacks of the zygote's descendants, each led by its
    command name, are appended to ``keep_path``.
    """
    data = daemon.directory / "perf.data"
    log = daemon.directory / "perf.log"
    command = [
        options.perf,
        "record",
        "--all-cpus",
        "--call-graph",
        "fp",
        "--event",
        "cpu-clock",
        "--freq",
        str(options.perf_frequency),
        "--output",
        str(data),
    ]
    with recording(command, log, ready_text=None) as process:
        # perf prints nothing when it starts to sample.
        time.sleep(SPY_SETTLE)
        if process.poll() is not None:
            raise RuntimeError(
                f"perf record exited with status {process.returncode} before the"
                f" cycles: {log_tail(log)}"
            )
        zygote = psutil.Process(daemon.zygote_pid)
        # The descendants that perf's fork events will not show: the pooled
        # supervisors and the warm sandboxes' PID 1s, started before perf.
        running = {child.pid for child in zygote.children(recursive=True)}
        meter = CpuMeter(daemon.daemon_pid, [psutil.Process(process.pid)], PERF_CPU)
        run_cycles(daemon.client, count, options.pause, meter, loop)
    script = daemon.directory / "perf-script.txt"
    try:
        _write_perf_script(options.perf, data, script)
        collapsed = _tally_perf(script, daemon.zygote_pid, running, loop.perf)
    finally:
        data.unlink(missing_ok=True)
        script.unlink(missing_ok=True)
    _keep("".join(f"{stack} {n}\n" for stack, n in collapsed.items()), keep_path)


def _write_perf_script(perf: str, data: Path, output: Path) -> None:
    command = [
        perf,
        "script",
        "--input",
        str(data),
        "--show-task-events",
        "--fields",
        "comm,pid,tid,ip,sym,dso",
    ]
    with open(output, "wb") as out:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=PERF_SCRIPT_TIMEOUT,
            check=False,
        )
    if result.returncode != 0:
        error = result.stderr.decode(errors="replace").strip()
        raise RuntimeError(
            f"perf script exited with status {result.returncode}: {error}"
        )


def _tally_perf(
    script: Path, zygote_pid: int, running: set[int], tally: PerfSampling
) -> Counter[str]:
    """Add the samples of the zygote's descendants in ``script`` to ``tally``.

    Returns their collapsed stacks, each led by the command name.
    """
    parents: dict[int, int] = {}
    with open(script, errors="replace") as lines:
        for item in perf_samples(lines):
            if not isinstance(item, PerfSample):
                child, parent = item
                parents[child] = parent
    # NOTE: a pid that the kernel reuses within one loop counts with its
    # first process. Linux allocates pids cyclically up to pid_max, so that
    # takes pid_max new tasks during the loop.
    children = running | descendants(parents, {zygote_pid, *running})
    collapsed: Counter[str] = Counter()
    with open(script, errors="replace") as lines:
        for item in perf_samples(lines):
            if not isinstance(item, PerfSample):
                continue
            tally.samples += 1
            if item.pid not in children:
                continue
            frames = kernel_stack(item.frames)
            tally.children.count(frames, 1, item.pid)
            tally.by_entry[kernel_entry(frames)] += 1
            by_command = tally.by_command.setdefault(item.comm, KindProfile())
            by_command.count(frames, 1, item.pid)
            names = [item.comm, *(frame.function for frame in frames)]
            collapsed[";".join(names)] += 1
    return collapsed


def _keep(text: str, target: Path) -> None:
    try:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as kept:
            kept.write(text)
    except OSError as error:
        logger.warning("failed to write the stacks to %s: %s", target, error)


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
        elif kind == PYSPY:
            py_spy_cycles(daemon, count, options, loop, f"{keep_prefix}-py-spy")
        else:
            keep_path = LOG_DIR / f"{keep_prefix}-perf.txt"
            perf_cycles(daemon, count, options, loop, keep_path)


def profile_pool(pool: int, options: argparse.Namespace) -> PoolRun:
    """Start a daemon with ``--warm-pool pool``, run every round, stop it."""
    name = f"profile-warm-pool-{pool}"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run = PoolRun(pool, {kind: Loop() for kind in options.loops})
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
            loops = options.loops
            shift = number % len(loops)
            order = [*loops[shift:], *loops[:shift]]
            count = _share(options.cycles, options.rounds, number)
            run_round(running, run, order, count, options, f"{name}-{stamp}")
            logger.info(
                "warm pool %d: round %d of %d done", pool, number + 1, options.rounds
            )
    logger.info("collapsed stacks: %s/%s-%s-*.txt", LOG_DIR, name, stamp)
    return run


def _share(total: int, parts: int, index: int) -> int:
    """Return part ``index`` of ``total`` split into ``parts`` near-equal parts."""
    return total // parts + (1 if index < total % parts else 0)


def _ms(values: list[float], fraction: float) -> str:
    return f"{percentile(values, fraction) * 1000:.2f}"


def _timing_rows(runs: list[PoolRun]) -> list[str]:
    columns = [
        (run.pool, kind, loop) for run in runs for kind, loop in run.loops.items()
    ]
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
    names = (DAEMON_CPU, ZYGOTE_CPU, REAPED_CPU, CLIENT_CPU, SPY_CPU, PERF_CPU)
    for name in names:
        cells = []
        for _, _, loop in columns:
            value = loop.cpu_per_cycle(name)
            cells.append("" if value is None else f"{value * 1000:.2f}")
        if any(cells):
            lines.append(f"| CPU of {name} (ms) | " + " | ".join(cells) + " |")
    return lines


def _sample_rows(runs: list[PoolRun]) -> list[str]:
    lines = [
        "| process kind | loop | "
        + " | ".join(f"pool {run.pool}: samples, processes" for run in runs)
        + " |",
        "|---|---|" + "---:|" * len(runs),
    ]
    rows: list[tuple[str, str, list[KindProfile | None]]] = [
        (kind, PYSPY, [run.loops[PYSPY].sampling.profiles.get(kind) for run in runs])
        for kind in (DAEMON, ZYGOTE)
    ]
    if PERF in runs[0].loops:
        rows.append((CHILDREN, PERF, [run.loops[PERF].perf.children for run in runs]))
    for kind, loop_kind, profiles in rows:
        cells = [
            "0" if profile is None else f"{profile.samples}, {len(profile.pids)}"
            for profile in profiles
        ]
        lines.append(f"| {kind} | {loop_kind} | " + " | ".join(cells) + " |")
    return lines


def _function_table(
    rows: list[tuple[Frame, float, float]],
    first: str,
    second: str,
    names: tuple[str, str] = ("function", "defined at"),
) -> list[str]:
    lines = [
        f"| {names[0]} | {names[1]} | {first} | {second} |",
        "|---|---|---:|---:|",
    ]
    for frame, share, other in rows:
        lines.append(
            f"| `{frame.function}` | `{frame.location}` | {share:.1f}% | {other:.1f}% |"
        )
    return [*lines, ""]


def _function_tables(run: PoolRun, top: int) -> list[str]:
    lines = []
    for kind in (DAEMON, ZYGOTE):
        profile = run.loops[PYSPY].sampling.profiles.get(kind)
        if profile is None:
            continue
        lines += [
            f"#### Pool {run.pool}: {kind}, {profile.samples} samples ({PYSPY})",
            "",
            "By inclusive samples:",
            "",
            *_function_table(profile.top_inclusive(top), "inclusive", "self"),
            "By self samples:",
            "",
            *_function_table(profile.top_self(top), "self", "inclusive"),
        ]
    return lines


def _perf_tables(run: PoolRun, top: int) -> list[str]:
    perf = run.loops[PERF].perf
    children = perf.children
    lines = [
        f"#### Pool {run.pool}: {CHILDREN}, {children.samples} samples ({PERF})",
        "",
        "By command name (perf's comm):",
        "",
        "| command | samples | share | processes |",
        "|---|---:|---:|---:|",
    ]
    ordered = sorted(
        perf.by_command.items(), key=lambda item: (-item[1].samples, item[0])
    )
    for command, profile in ordered[:top]:
        lines.append(
            f"| `{command}` | {profile.samples}"
            f" | {children.percent(profile.samples):.1f}% | {len(profile.pids)} |"
        )
    lines += [
        "",
        "By system call or other kernel entry (stacks.kernel_entry):",
        "",
        "| kernel entry | samples | share |",
        "|---|---:|---:|",
    ]
    for entry, samples in sorted(
        perf.by_entry.items(), key=lambda item: (-item[1], item[0])
    )[:top]:
        lines.append(f"| `{entry}` | {samples} | {children.percent(samples):.1f}% |")
    symbol = ("symbol", "object")
    return [
        *lines,
        "",
        "By inclusive samples:",
        "",
        *_function_table(children.top_inclusive(top), "inclusive", "self", symbol),
        "By self samples:",
        "",
        *_function_table(children.top_self(top), "self", "inclusive", symbol),
    ]


def _run_sentence(run: PoolRun, perf_frequency: int) -> str:
    walls = ", ".join(
        f"{loop.wall_seconds:.1f} s ({kind})" for kind, loop in run.loops.items()
    )
    sampling = run.loops[PYSPY].sampling
    sentence = (
        f"Pool {run.pool}: wall time {walls}. py-spy reported {sampling.samples}"
        f" samples, {sampling.errors} errors, at most"
        f" {sampling.max_lag_seconds:.2f} s behind its schedule."
    )
    if PERF in run.loops:
        perf = run.loops[PERF].perf
        sentence += (
            f" perf recorded {perf.samples} samples at {perf_frequency} Hz per CPU,"
            f" idle CPUs included; {perf.children.samples} of them are of the"
            f" {CHILDREN}."
        )
    return sentence


def render(runs: list[PoolRun], options: argparse.Namespace) -> str:
    """Return the report: timings and CPU per cycle, samples, top functions."""
    idle = " --idle" if options.idle else ""
    perf = ""
    if PERF in options.loops:
        perf = (
            " perf ran as `perf record --all-cpus --call-graph fp --event cpu-clock"
            f" --freq {options.perf_frequency}`."
        )
    lines = [
        f"Per daemon: {options.warmup} warm-up cycles, then {options.rounds}"
        f" rounds in which each kind of loop runs a share of its {options.cycles}"
        f" cycles, each cycle followed by a {options.pause:g} s pause. py-spy"
        f" ran as `py-spy record --function --nonblocking --rate"
        f" {options.rate}{idle}`.{perf} "
        + " ".join(_run_sentence(run, options.perf_frequency) for run in runs),
        "",
        *_timing_rows(runs),
        "",
        *_sample_rows(runs),
        "",
    ]
    for run in runs:
        lines += _function_tables(run, options.top)
        if PERF in run.loops:
            lines += _perf_tables(run, options.top)
    return "\n".join(lines).rstrip("\n") + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile",
        description="Profile the create, exec and terminate cycle of an engine"
        " daemon: py-spy on the daemon and its zygote, and perf on the zygote's"
        " descendants (supervisors, PID 1s, sandbox processes). Needs root.",
    )
    parser.add_argument(
        "--cycles",
        type=int,
        default=200,
        metavar="N",
        help="cycles of each kind of loop (no profiler, py-spy on the daemon"
        " and the zygote, perf on all CPUs) per pool size (default: 200)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        metavar="N",
        help="rounds that the cycles are split into; each round runs every"
        " kind of loop in turn (default: 4)",
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
        "--perf-frequency",
        type=int,
        default=999,
        metavar="HZ",
        help="samples per second and CPU of `perf record` (default: 999)",
    )
    parser.add_argument(
        "--no-perf",
        action="store_true",
        help="leave out the loops under `perf record`, which need perf on PATH",
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
    positive = (options.cycles, options.rounds, options.rate, options.top)
    if min(*positive, options.perf_frequency) < 1:
        raise SystemExit(
            "error: --cycles, --rounds, --rate, --perf-frequency and --top must be"
            " 1 or more"
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
    options.loops = (UNPROFILED, PYSPY)
    if not options.no_perf:
        options.perf = shutil.which("perf")
        if options.perf is None:
            raise SystemExit(
                "error: perf not found on PATH; install it (Debian: linux-perf)"
                " or pass --no-perf"
            )
        options.loops = (UNPROFILED, PYSPY, PERF)
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
