"""`python -m benchmarks.exhaustion`: exec latency of one sandbox while another attacks.

    sudo .venv/bin/python -m benchmarks.exhaustion --update-docs

For each attack, a fresh attacker sandbox runs the attack while a victim
sandbox in the same engine measures its exec round trip of `true`. The report
gives the victim's median during each attack against its idle median, measured
in the same run, and how long terminating the attacker took. Both sandboxes
have the engine's default limits (1 core, 512 MiB, 512 pids). The engine runs
embedded in this process, so the figures include no gRPC hop.

tests/integration/test_exhaustion.py runs the same attacks, shorter, and
asserts a generous bound on the slowdown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.machine import describe_machine, machine_summary
from benchmarks.report import replace_section
from engine.config import Config
from engine.core.engine import Engine
from engine.core.models import SandboxSpec

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"
SECTION_START = "<!-- exhaustion:start -->"
SECTION_END = "<!-- exhaustion:end -->"


@dataclass(frozen=True)
class Attack:
    """A hostile program and the seconds it gets to ramp up before measuring."""

    name: str
    description: str
    argv: list[str]
    ramp_seconds: float = 1.0


def _python(code: str) -> list[str]:
    return ["python3", "-c", code]


def busy_loops_argv(loops: int) -> list[str]:
    """Return the argv of a shell that runs ``loops`` busy loops until killed.

    The loops are background subshells in the shell's process group, so
    killing that group ends them all.
    """
    return [
        "sh",
        "-c",
        f"for i in $(seq {loops}); do (while :; do :; done) & done; wait",
    ]


ATTACKS = [
    Attack(
        "fork bomb",
        "a shell function that pipes into itself in the background",
        ["sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 1000"],
    ),
    Attack(
        "memory bomb",
        "allocate and touch 64 MiB blocks until the OOM killer ends it, again",
        [
            "sh",
            "-c",
            "while :; do python3 -c 'b = []\nwhile True: b.append(bytearray(64 << 20))'"
            "; done",
        ],
    ),
    Attack(
        "CPU spin",
        "one busy loop per host core, and as many again",
        busy_loops_argv(2 * (os.cpu_count() or 1)),
    ),
    Attack(
        "fill /tmp",
        "write zeros to /tmp until ENOSPC, then hold the file",
        ["sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M; sleep 1000"],
        ramp_seconds=3.0,
    ),
    Attack(
        "inode exhaustion",
        "create empty files in /tmp without end",
        _python(
            "import os\nn = 0\nwhile True:\n"
            "    try:\n        open(f'/tmp/f{n}', 'w').close()\n"
            "    except OSError:\n        break\n    n += 1\n"
            "import time\ntime.sleep(1000)"
        ),
        ramp_seconds=3.0,
    ),
    Attack(
        "huge argv",
        "an exec whose 900 arguments of 1000 bytes each come through the API",
        ["sh", "-c", "exec sleep 1000", "sh", *["x" * 1000] * 900],
    ),
    Attack(
        "output flood",
        "`yes` to stdout for 60 s before the victim's execs",
        ["yes"],
        ramp_seconds=60.0,
    ),
    Attack(
        "tiny writes",
        "one-byte writes to stdout in a loop",
        _python("import os\nwhile True: os.write(1, b'x')"),
    ),
    Attack(
        "SIGTERM ignorers",
        "400 processes that ignore SIGTERM",
        [
            "sh",
            "-c",
            "i=0; while [ $i -lt 400 ]; do"
            " sh -c 'trap \"\" TERM; exec sleep 1000' & i=$((i + 1)); done; wait",
        ],
        ramp_seconds=2.0,
    ),
    Attack(
        "zombies",
        "300 children that exit and are never waited for",
        _python(
            "import os, time\nfor _ in range(300):\n"
            "    if os.fork() == 0:\n        os._exit(0)\ntime.sleep(1000)"
        ),
    ),
    Attack(
        "fd exhaustion",
        "20 processes each opening /dev/null up to its descriptor limit",
        [
            "sh",
            "-c",
            "for i in $(seq 20); do python3 -c '"
            "import time\nfs = []\n"
            'try:\n    while True: fs.append(open("/dev/null"))\n'
            "except OSError: pass\ntime.sleep(1000)' & done; wait",
        ],
    ),
]


@dataclass
class Outcome:
    attack: Attack
    samples_ms: list[float] = field(default_factory=list)
    terminate_ms: float = 0.0


async def exec_round_trip(engine: Engine, sandbox_id: str) -> float:
    """Run `true` to its exit in ``sandbox_id`` and return the milliseconds it took."""
    start = time.perf_counter()
    process = await engine.exec(sandbox_id, ["true"])
    await engine.wait(sandbox_id, process.pid, None)
    return (time.perf_counter() - start) * 1000


async def round_trips(engine: Engine, sandbox_id: str, count: int) -> list[float]:
    return [await exec_round_trip(engine, sandbox_id) for _ in range(count)]


async def drain(engine: Engine, sandbox_id: str, pid: int) -> None:
    """Discard a process's stdout as the engine buffers it, as a reader would."""
    from engine.core.models import Stream

    async for _ in engine.read_output(sandbox_id, pid, Stream.STDOUT, 0):
        pass


async def run_attack(
    engine: Engine,
    victim: str,
    attack: Attack,
    samples: int,
    ramp_scale: float = 1.0,
) -> Outcome:
    """Run ``attack`` in a new sandbox while timing execs in ``victim``."""
    outcome = Outcome(attack)
    attacker = (await engine.create_sandbox(SandboxSpec())).sandbox_id
    reader: asyncio.Task[None] | None = None
    try:
        process = await engine.exec(attacker, attack.argv)
        reader = asyncio.create_task(drain(engine, attacker, process.pid))
        await asyncio.sleep(attack.ramp_seconds * ramp_scale)
        outcome.samples_ms = await round_trips(engine, victim, samples)
    finally:
        start = time.perf_counter()
        await engine.terminate_sandbox(attacker)
        outcome.terminate_ms = (time.perf_counter() - start) * 1000
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return outcome


async def measure(
    engine: Engine,
    samples: int,
    attacks: list[Attack],
    progress: Callable[[str], Awaitable[None] | None] = print,
) -> tuple[list[float], list[Outcome]]:
    victim = (await engine.create_sandbox(SandboxSpec())).sandbox_id
    try:
        await round_trips(engine, victim, 3)
        idle = await round_trips(engine, victim, samples)
        outcomes = []
        for attack in attacks:
            progress(f"attack: {attack.name}")
            outcomes.append(await run_attack(engine, victim, attack, samples))
        return idle, outcomes
    finally:
        await engine.terminate_sandbox(victim)


def render(machine: str, idle: list[float], outcomes: list[Outcome]) -> str:
    idle_median = statistics.median(idle)
    lines = [
        f"Machine: {machine}.",
        "",
        f"Victim exec round trip of `true`, idle: median {idle_median:.2f} ms"
        f" over {len(idle)} execs.",
        "",
        "| attack in another sandbox | victim median (ms) | ratio to idle |"
        " victim max (ms) | terminate attacker (ms) |",
        "|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        median = statistics.median(outcome.samples_ms)
        lines.append(
            f"| {outcome.attack.name}: {outcome.attack.description}"
            f" | {median:.2f} | {median / idle_median:.2f}x"
            f" | {max(outcome.samples_ms):.2f} | {outcome.terminate_ms:.0f} |"
        )
    return "\n".join(lines) + "\n"


def update_docs(path: Path, markdown: str) -> None:
    """Replace the exhaustion section of ``path``, appending it if absent."""
    missing = f"\n{SECTION_START}\n{SECTION_END}\n"
    replace_section(path, SECTION_START, SECTION_END, markdown, missing)


async def _main(samples: int) -> tuple[list[float], list[Outcome]]:
    data_dir = Path(tempfile.mkdtemp(prefix="engine-exhaustion-"))
    data_dir.chmod(0o755)
    engine = Engine(Config.from_data_dir(data_dir))
    try:
        await engine.start()
        return await measure(engine, samples, ATTACKS)
    finally:
        await engine.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.exhaustion",
        description="Measure a sandbox's exec round trip while another sandbox"
        " runs each resource-exhaustion attack. Needs root.",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=30,
        metavar="N",
        help="execs timed in the victim per attack (default: 30)",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help=f"write the table into {DEFAULT_DOCS.relative_to(ROOT)}",
    )
    options = parser.parse_args(argv)
    if options.samples < 1:
        parser.error(f"invalid --samples {options.samples}: expected 1 or more")
    idle, outcomes = asyncio.run(_main(options.samples))
    markdown = render(machine_summary(describe_machine()), idle, outcomes)
    print(markdown)
    if options.update_docs:
        update_docs(DEFAULT_DOCS, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
