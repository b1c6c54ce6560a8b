"""Resource exhaustion in one sandbox, measured from another.

Each attack from benchmarks/exhaustion.py runs in a fresh sandbox with the
default limits while a victim sandbox times its exec round trip. The bound is
deliberately generous (10 times the idle median, and never below
MIN_BOUND_MS), since the machine is shared; docs/benchmarks.md has the
measured figures.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.exhaustion import ATTACKS, Attack, round_trips, run_attack
from engine.core.models import SandboxState
from tests.conftest import EngineRunner

SAMPLES = 10
MIB = 1024 * 1024
SLOWDOWN_BOUND = 10.0
# A floor for the bound, so that a 2 ms idle median does not turn scheduler
# noise on this shared 2-core machine into a failure.
MIN_BOUND_MS = 50.0
# Milliseconds that terminating an attacker may take.
TERMINATE_BOUND_MS = 10_000.0
# Creates a file in /tmp and writes 8 KiB to it, which fails once /tmp is full.
WRITE_PROBE = (
    "import os\n"
    "with open(f'/tmp/probe-{os.getpid()}', 'wb') as probe:\n"
    "    probe.write(bytes(8192))\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda attack: attack.name)
def test_attack_contained(
    engine: EngineRunner, new_sandbox: Callable[..., str], attack: Attack
) -> None:
    victim = new_sandbox()
    engine.call(round_trips(engine.engine, victim, 3))
    idle = statistics.median(engine.call(round_trips(engine.engine, victim, SAMPLES)))
    before = engine.cgroup_names()
    # Long ramps, such as the benchmark's 60 s flood, shrink to 3 s here.
    ramp_scale = min(1.0, 3.0 / attack.ramp_seconds)
    outcome = engine.call(
        run_attack(engine.engine, victim, attack, SAMPLES, ramp_scale), 120
    )
    during = statistics.median(outcome.samples_ms)
    bound = max(SLOWDOWN_BOUND * idle, MIN_BOUND_MS)
    assert during <= bound, f"victim median {during:.1f} ms, idle {idle:.1f} ms"
    assert outcome.terminate_ms <= TERMINATE_BOUND_MS
    assert engine.state(victim) == SandboxState.RUNNING
    after = engine.run(victim, ["echo", "alive"])
    assert after.stdout == b"alive\n"
    engine.settle_pool()
    assert engine.cgroup_names() - before - engine.pool_names() == set()


def _dirty_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("/proc/meminfo has no Dirty line")


def test_sync_leaves_host_writeback_alone(
    engine: EngineRunner, new_sandbox: Callable[..., str], tmp_path: Path
) -> None:
    # 256 MiB of dirty page cache on the host's own disk stays unwritten for
    # the kernel's expiry time (30 s by default) unless someone syncs.
    sandbox_id = new_sandbox()
    dirty = tmp_path / "dirty"
    with open(dirty, "wb") as file:
        for _ in range(256):
            file.write(bytes(MIB))
    before = _dirty_bytes()
    synced = engine.run(sandbox_id, ["sync"])
    after_sync = _dirty_bytes()
    synced_fs = engine.run(sandbox_id, ["sync", "-f", "/"])
    after_syncfs = _dirty_bytes()
    dirty.unlink()
    assert before >= 200 * MIB
    assert synced.exit_code == 0
    assert synced_fs.exit_code == 0
    assert after_sync >= 128 * MIB
    assert after_syncfs >= 128 * MIB


@pytest.mark.parametrize("name", ["fill /tmp", "inode exhaustion"])
def test_sandbox_usable_after_filling_tmp(
    engine: EngineRunner, new_sandbox: Callable[..., str], name: str
) -> None:
    attack = next(attack for attack in ATTACKS if attack.name == name)
    sandbox_id = new_sandbox()
    filler = engine.exec(sandbox_id, attack.argv)
    engine.wait_until(
        lambda: engine.python(sandbox_id, WRITE_PROBE).exit_code != 0,
        f"{name} to fill /tmp",
        timeout=60,
    )
    alive = engine.run(sandbox_id, ["echo", "alive"])
    assert alive.stdout == b"alive\n"
    engine.call(engine.engine.kill(sandbox_id, filler.pid, 9))
    listed = engine.run(sandbox_id, ["ls", "/"])
    assert listed.exit_code == 0
    assert engine.state(sandbox_id) == SandboxState.RUNNING


def test_output_flood_throttled_and_drained(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox()
    sandbox = engine.engine.sandboxes[sandbox_id]
    flood = engine.exec(sandbox_id, ["yes"])
    # `yes` writes far faster than the output rate, so its pipe gets paused.
    engine.wait_until(lambda: bool(sandbox.paused_readers), "a paused output pipe")
    engine.terminate(sandbox_id)
    assert sandbox.paused_readers == {}
    process = sandbox.processes[flood.pid]
    engine.wait_until(
        lambda: process.stdout.closed and process.stderr.closed,
        "the flood's pipes to reach EOF and close",
    )
