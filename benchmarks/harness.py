"""Set up every benchmarked system, sample them all in one run, and clean up.

A system that cannot be set up (a missing tool, no root) keeps its rows, with
the reason in place of figures. Everything the harness starts lives under one
temporary work dir and is stopped by pid or container id before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks import runtimes
from benchmarks.clientprocess import ClientProcess
from benchmarks.engines import (
    CGROUP_LIMITS,
    WARM_POOL_SIZE,
    Daemon,
    EmbeddedRuns,
    requires_root_reason,
)
from benchmarks.isolation import PROBE_ARGV, Layers, parse_probe
from benchmarks.machine import describe_machine
from benchmarks.report import (
    DIRECT_RUN_SYSTEM,
    DIRECT_SYSTEM,
    FORK_EXEC_SYSTEM,
    GRPC_HEALTH_SYSTEM,
    GRPC_NETWORK_SYSTEM,
    GRPC_RUN_SYSTEM,
    targets,
)
from benchmarks.suite import (
    COLD_START,
    EXEC,
    EXEC_BURST,
    PER_SECOND,
    SECONDS,
    THROUGHPUT,
    Case,
    back_to_back,
    back_to_back_async,
    run_round_robin,
    threaded,
    throughput_system,
)

logger = logging.getLogger(__name__)

# Seconds to wait for a leftover child process after SIGKILL.
KILL_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class Options:
    """Settings of one run, as `python -m benchmarks --help` describes them."""

    iterations: int = 30
    warmup: int = 3
    throughput_cycles: int = 5
    sustained_cycles: int = 25
    refill: float = 2.0
    concurrency: tuple[int, ...] = (1, 4)
    pause: float = 0.25
    seed: int = 1
    burst: int = 10
    install: bool = True
    work_dir: Path = Path("/tmp")


@dataclass
class _Run:
    """State shared by the setup steps: rows, probe results and cleanup problems."""

    work: Path
    stack: contextlib.AsyncExitStack
    cases: list[Case] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    layers: dict[str, Layers | str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(
        self,
        measurement: str,
        system: str,
        label: str,
        run: Callable[[], Awaitable[Any]] | None,
        unavailable: str,
        unit: str = SECONDS,
    ) -> None:
        self.cases.append(
            Case(measurement, system, label, unit, run, unavailable=unavailable)
        )

    def cleanup(self, description: str, function: Callable[[], Any]) -> None:
        """Register a blocking cleanup step whose failure is recorded, not raised."""

        async def step() -> None:
            try:
                await asyncio.to_thread(function)
            except Exception as error:
                logger.error("cleanup: %s failed: %s", description, error)
                self.problems.append(f"{description} failed: {error}")

        self.stack.push_async_callback(step)

    async def probe(
        self,
        system: str,
        run_probe: Callable[[], Awaitable[str]],
        cgroup_limits: str = "",
        cgroup_note: str = "",
    ) -> None:
        try:
            output = await run_probe()
            self.layers[system] = parse_probe(output, cgroup_limits, cgroup_note)
        except Exception as error:
            logger.error("isolation probe of %s failed: %s", system, error)
            self.layers[system] = f"probe failed: {error}"


async def _set_up_grpc(run: _Run, options: Options) -> None:
    system = "engine-grpc"
    run.labels[system] = "engine, gRPC (daemon subprocess)"
    reason = requires_root_reason()
    runs: ClientProcess | None = None
    if not reason:
        daemon = Daemon(run.work / "grpc", ("--warm-pool", str(WARM_POOL_SIZE)))

        def stop_daemon() -> None:
            status = daemon.stop()
            # A daemon that failed to start already gave its reason to the rows.
            if daemon.serving and status != 0:
                run.problems.append(
                    f"engine daemon exited with status {status}; log:"
                    f" {daemon.log_tail(5)}"
                )

        run.cleanup("stopping the engine daemon", stop_daemon)
        try:
            await asyncio.to_thread(daemon.start)
            # A client process of its own, so that the embedded engine's work
            # in this process does not hold up the timed gRPC calls.
            runs = ClientProcess(daemon.address)
            run.cleanup("closing the gRPC clients", runs.close)
            # The first sandbox of a data dir also builds the host image.
            await asyncio.to_thread(runs.start_exec_sandbox)
        except Exception as error:
            logger.error("engine daemon setup failed: %s", error)
            reason = f"daemon setup failed: {error}"
            runs = None
    network_label = "engine, gRPC, bridged network (daemon subprocess)"
    run.labels[GRPC_NETWORK_SYSTEM] = network_label
    if runs is not None:
        await run.probe(
            system, lambda: asyncio.to_thread(runs.probe, PROBE_ARGV), CGROUP_LIMITS
        )
        await run.probe(
            GRPC_NETWORK_SYSTEM,
            lambda: asyncio.to_thread(runs.probe, PROBE_ARGV, False),
            CGROUP_LIMITS,
        )
    run_label = "engine, gRPC Run RPC (daemon subprocess)"
    run.labels[GRPC_RUN_SYSTEM] = run_label
    direct_label = "engine, SDK Exec stream on the direct socket (daemon subprocess)"
    run.labels[DIRECT_SYSTEM] = direct_label
    direct_run_label = "engine, SDK Run on the direct socket (daemon subprocess)"
    run.labels[DIRECT_RUN_SYSTEM] = direct_run_label
    health_label = "for reference: gRPC Health Check on the same daemon"
    run.labels[GRPC_HEALTH_SYSTEM] = health_label
    run.layers[GRPC_HEALTH_SYSTEM] = "no sandbox: the cost of a unary RPC alone"
    label = run.labels[system]
    # The exec rows share one daemon and one sandbox.
    exec_rows = {
        system: (label, "exec", False),
        GRPC_RUN_SYSTEM: (run_label, "run", False),
        DIRECT_SYSTEM: (direct_label, "exec", True),
        DIRECT_RUN_SYSTEM: (direct_run_label, "run", True),
    }
    if system in run.layers:
        for key in exec_rows:
            run.layers[key] = run.layers[system]
    if runs is None:
        run.add(COLD_START, system, label, None, reason)
        for key, (row_label, _, _) in exec_rows.items():
            for measurement in (EXEC, EXEC_BURST):
                run.add(measurement, key, row_label, None, reason)
        run.add(EXEC, GRPC_HEALTH_SYSTEM, health_label, None, reason)
        run.add(COLD_START, GRPC_NETWORK_SYSTEM, network_label, None, reason)
    else:
        run.add(COLD_START, system, label, threaded(runs.cold_start), reason)
        run.add(
            COLD_START,
            GRPC_NETWORK_SYSTEM,
            network_label,
            threaded(runs.cold_start, False),
            reason,
        )
        for key, (row_label, kind, direct) in exec_rows.items():
            single = runs.exec_round_trip if kind == "exec" else runs.run_round_trip
            burst = runs.exec_burst if kind == "exec" else runs.run_burst
            run.add(EXEC, key, row_label, threaded(single, direct), reason)
            run.add(
                EXEC_BURST,
                key,
                row_label,
                threaded(burst, options.burst, direct),
                reason,
            )
        health = threaded(runs.health_round_trip)
        run.add(EXEC, GRPC_HEALTH_SYSTEM, health_label, health, reason)
    for clients in options.concurrency:
        sample = None
        if runs is not None:
            sample = threaded(
                runs.throughput, clients, options.throughput_cycles, options.refill
            )
        run.add(
            THROUGHPUT,
            throughput_system(clients),
            f"{clients} client" + ("" if clients == 1 else "s"),
            sample,
            reason,
            unit=PER_SECOND,
        )
    clients = max(options.concurrency)
    sustained = None
    if runs is not None:
        sustained = threaded(runs.throughput, clients, options.sustained_cycles)
    run.add(
        THROUGHPUT,
        throughput_system(clients, sustained=True),
        f"{clients} clients, sustained: {options.sustained_cycles} pairs each,"
        " no refill pause",
        sustained,
        reason,
        unit=PER_SECOND,
    )


async def _set_up_embedded(run: _Run, options: Options) -> None:
    system = "engine-embedded"
    run.labels[system] = "engine, embedded (Engine on the harness's event loop)"
    reason = requires_root_reason()
    runs: EmbeddedRuns | None = None
    if not reason:
        runs = embedded = EmbeddedRuns(run.work / "embedded")

        async def close() -> None:
            try:
                await embedded.close()
            except Exception as error:
                logger.error("cleanup: closing the embedded engine failed: %s", error)
                run.problems.append(f"closing the embedded engine failed: {error}")

        run.stack.push_async_callback(close)
        try:
            await runs.start()
            await runs.start_exec_sandbox()
        except Exception as error:
            logger.error("embedded engine setup failed: %s", error)
            reason = f"embedded engine setup failed: {error}"
            runs = None
    if runs is not None:
        await run.probe(system, lambda: runs.probe(PROBE_ARGV), CGROUP_LIMITS)
    label = run.labels[system]
    if runs is None:
        for measurement in (COLD_START, EXEC, EXEC_BURST):
            run.add(measurement, system, label, None, reason)
        return
    exec_burst = back_to_back_async(runs.exec_round_trip, options.burst)
    run.add(COLD_START, system, label, runs.cold_start, reason)
    run.add(EXEC, system, label, runs.exec_round_trip, reason)
    run.add(EXEC_BURST, system, label, exec_burst, reason)


async def _set_up_bwrap(run: _Run, tool: runtimes.Tool) -> None:
    system = "bwrap"
    version = tool.version.split()[-1] if tool.path else ""
    label = run.labels[system] = f"bubblewrap {version}".strip()
    if tool.path is None:
        run.add(COLD_START, system, label, None, tool.reason)
        return
    bwrap = runtimes.Bubblewrap(tool)
    await run.probe(system, lambda: asyncio.to_thread(bwrap.probe, PROBE_ARGV))
    run.add(COLD_START, system, label, threaded(bwrap.run_true), "")


async def _set_up_runc(run: _Run, tool: runtimes.Tool, options: Options) -> None:
    system = "runc"
    version = tool.version.split()[-1] if tool.path else ""
    run.labels[system] = f"runc {version}".strip()
    reason = tool.reason
    runc: runtimes.Runc | None = None
    if tool.path and os.geteuid() != 0:
        reason = "needs root for `runc run` with a rootful config"
    elif tool.path:
        try:
            runc = await asyncio.to_thread(runtimes.Runc, tool, run.work / "runc")
        except Exception as error:
            logger.error("runc bundle setup failed: %s", error)
            reason = f"bundle setup failed: {error}"
    exec_reason = reason
    if runc is not None:

        def close_runc() -> None:
            assert runc is not None
            run.problems.extend(f"left behind: {item}" for item in runc.close())

        run.cleanup("deleting the runc containers", close_runc)
        await run.probe(
            system,
            lambda: asyncio.to_thread(runc.probe, PROBE_ARGV),
            cgroup_note="a cgroup per container",
        )
        try:
            await asyncio.to_thread(runc.start_exec_container)
        except Exception as error:
            logger.error("runc exec container failed to start: %s", error)
            exec_reason = f"exec container failed to start: {error}"
    label = run.labels[system]
    exec_label = f"{label}: `runc exec`"
    if runc is None:
        run.add(COLD_START, system, label, None, reason)
    else:
        run.add(COLD_START, system, label, threaded(runc.run_true), "")
    if runc is None or runc.exec_container is None:
        run.add(EXEC, system, exec_label, None, exec_reason)
        run.add(EXEC_BURST, system, exec_label, None, exec_reason)
    else:
        exec_burst = back_to_back(runc.exec_true, options.burst)
        run.add(EXEC, system, exec_label, threaded(runc.exec_true), "")
        run.add(EXEC_BURST, system, exec_label, threaded(exec_burst), "")


async def _set_up_baselines(run: _Run, options: Options) -> None:
    fork_exec = runtimes.ForkExec()
    run.cleanup("stopping the fork+exec helper", fork_exec.close)
    baselines = {
        "posix-spawn": (
            "baseline: os.posix_spawn + waitpid",
            runtimes.posix_spawn_true,
        ),
        FORK_EXEC_SYSTEM: (
            "baseline: os.fork + os.execv + waitpid",
            fork_exec.run_true,
        ),
        "subprocess": ("baseline: subprocess.run", runtimes.subprocess_true),
    }
    await run.probe("host", lambda: asyncio.to_thread(runtimes.host_probe, PROBE_ARGV))
    host = run.layers.pop("host")
    for system, (label, _) in baselines.items():
        run.labels[system] = label
        run.layers[system] = host
    for measurement in (COLD_START, EXEC):
        for system, (label, function) in baselines.items():
            run.add(measurement, system, label, threaded(function), "")
    for system, (label, function) in baselines.items():
        run.add(
            EXEC_BURST,
            system,
            label,
            threaded(back_to_back(function, options.burst)),
            "",
        )


def _stop_leftover_children() -> list[str]:
    """Kill this process's remaining child processes by pid and describe each one."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            description = f"process {child.pid} ({' '.join(child.cmdline())[:80]})"
            logger.error("leftover %s; killing it", description)
            found.append(description)
            child.send_signal(signal.SIGKILL)
    psutil.wait_procs(
        psutil.Process().children(recursive=True), timeout=KILL_WAIT_SECONDS
    )
    return found


async def run_benchmarks(options: Options) -> tuple[dict[str, Any], list[Case]]:
    """Set up the systems, sample them interleaved and clean up.

    Returns the run's metadata and the cases with their samples.
    """
    started = datetime.datetime.now(datetime.UTC)
    machine = describe_machine()
    load_before = os.getloadavg()[0]
    tools = await asyncio.to_thread(runtimes.find_tools, options.install)
    work = Path(tempfile.mkdtemp(prefix="engine-bench-", dir=options.work_dir))
    # The sandboxes' mapped uids must traverse the data dirs inside it.
    work.chmod(0o755)
    logger.info("work dir %s", work)
    stack = contextlib.AsyncExitStack()
    run = _Run(work=work, stack=stack)
    try:
        async with stack:
            await _set_up_grpc(run, options)
            await _set_up_embedded(run, options)
            await _set_up_bwrap(run, tools["bwrap"])
            await _set_up_runc(run, tools["runc"], options)
            await _set_up_baselines(run, options)
            await run_round_robin(
                run.cases,
                iterations=options.iterations,
                warmup=options.warmup,
                pause=options.pause,
                seed=options.seed,
            )
    finally:
        run.problems += [
            f"left behind: {item}"
            for item in await asyncio.to_thread(_stop_leftover_children)
        ]
        shutil.rmtree(work, ignore_errors=True)
        if work.exists():
            run.problems.append(f"left behind: work dir {work}")
    finished = datetime.datetime.now(datetime.UTC)
    option_values = asdict(options)
    option_values["work_dir"] = str(options.work_dir)
    option_values["concurrency"] = list(options.concurrency)
    result = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "options": option_values,
        "machine": machine,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "tools": {name: asdict(tool) for name, tool in tools.items()},
        "tool_versions": [
            tool.version if tool.path else f"{name}: not available ({tool.reason})"
            for name, tool in tools.items()
        ],
        "system_labels": run.labels,
        "layers_objects": run.layers,
        "targets": targets(run.cases),
        "cleanup_problems": run.problems,
    }
    return result, run.cases
