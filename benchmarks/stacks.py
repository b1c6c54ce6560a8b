"""Samples of py-spy's collapsed stacks, summed per kind of engine process.

``py-spy record --subprocesses --function --format raw`` writes one line per
distinct stack: the frames from the outermost to the innermost, joined by
";", then a space and the number of samples. A sample is the stack of one
thread at one sampling tick. With --subprocesses the line starts with one
``process PID:"COMMAND LINE"`` frame for each process from the profiled one
down to the sampled one, and every other frame reads ``FUNCTION (FILE:LINE)``,
where LINE is the function's first line because of --function.

``aggregate`` sorts each stack to a process kind by that chain of processes:
the daemon, its zygote, and the zygote's forked children (supervisors, PID
1s before they execute engine-init, file workers). The forked children run
the zygote's command line, so their own frames tell them apart. Without
--subprocesses there is no chain, and every stack is of the profiled process.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

DAEMON = "daemon"
ZYGOTE = "zygote"
SUPERVISOR = "supervisor"
INIT = "PID 1 before exec"
FILE_WORKER = "file worker"
OTHER = "other"
# Report order of the kinds.
KINDS = (DAEMON, ZYGOTE, SUPERVISOR, INIT, FILE_WORKER, OTHER)

ZYGOTE_MODULE = "engine.runtime.zygote"
# (function, file) of the loop or entry function of each kind of thread. The
# frames that call the innermost of them in a stack are the same in every
# sample of that thread, so they are left out of the inclusive counts. In a
# forked child they are the zygote's frames from before the fork.
ENTRY_FRAMES = frozenset(
    {
        ("BaseEventLoop._run_once", "asyncio/base_events.py"),
        ("_worker", "concurrent/futures/thread.py"),
        ("Thread.run", "threading.py"),
        ("Zygote.serve", "engine/runtime/zygote.py"),
        ("run", "engine/runtime/supervisor.py"),
        ("_run_init", "engine/runtime/supervisor.py"),
        ("run", "engine/runtime/fileworker.py"),
    }
)
_PROCESS = re.compile(r'process (\d+):"(.*?)";')
_FRAME = re.compile(r"(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)")


@dataclass(frozen=True)
class Frame:
    """One Python frame of a stack: the function and where it is defined."""

    function: str
    file: str
    line: int | None

    @property
    def location(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


@dataclass
class KindProfile:
    """The samples of one process kind, by function."""

    samples: int = 0
    pids: set[int] = field(default_factory=set)
    # Samples whose stack contains the function, counted once per stack.
    inclusive: Counter[Frame] = field(default_factory=Counter)
    # Samples whose innermost frame is the function.
    self_samples: Counter[Frame] = field(default_factory=Counter)

    def top_inclusive(self, count: int) -> list[tuple[Frame, float, float]]:
        """Return the ``count`` functions with the most inclusive samples.

        Each item is the frame, its inclusive share and its self share of
        this kind's samples, in percent.
        """
        return self._top(self.inclusive, self.self_samples, count)

    def top_self(self, count: int) -> list[tuple[Frame, float, float]]:
        """Return the ``count`` functions with the most self samples.

        Each item is the frame, its self share and its inclusive share of
        this kind's samples, in percent.
        """
        return self._top(self.self_samples, self.inclusive, count)

    def _top(
        self, ranked: Counter[Frame], other: Counter[Frame], count: int
    ) -> list[tuple[Frame, float, float]]:
        # Ties go by location, so the same input always gives the same table.
        ordered = sorted(ranked.items(), key=lambda item: (-item[1], item[0].location))
        return [
            (frame, self.percent(samples), self.percent(other[frame]))
            for frame, samples in ordered[:count]
        ]

    def add(self, other: KindProfile) -> None:
        """Add the samples of ``other``, such as another round of the same kind."""
        self.samples += other.samples
        self.pids |= other.pids
        self.inclusive.update(other.inclusive)
        self.self_samples.update(other.self_samples)

    def percent(self, samples: int) -> float:
        return 100.0 * samples / self.samples if self.samples else 0.0


def parse_frame(text: str) -> Frame:
    """Parse one ``FUNCTION (FILE:LINE)`` frame of py-spy's raw output."""
    match = _FRAME.fullmatch(text)
    if match is None:
        return Frame(text, "", None)
    line = match.group("line")
    return Frame(
        match.group("function"), match.group("file"), int(line) if line else None
    )


def parse_line(line: str) -> tuple[list[tuple[int, str]], list[Frame], int] | None:
    """Split one raw line into its processes, its frames and its sample count.

    Returns None for a blank line. Raises ValueError when the line does not
    end in a sample count.
    """
    line = line.rstrip("\n")
    if not line.strip():
        return None
    stack, _, count = line.rpartition(" ")
    if not count.isdigit():
        raise ValueError(f"invalid py-spy raw line, no sample count at the end: {line}")
    processes = []
    position = 0
    stack += ";"
    while match := _PROCESS.match(stack, position):
        processes.append((int(match.group(1)), match.group(2)))
        position = match.end()
    frames = [parse_frame(text) for text in stack[position:].split(";") if text]
    return processes, frames, int(count)


def process_kind(
    command_lines: list[str], frames: list[Frame], root: str = DAEMON
) -> str:
    """Return the kind of the innermost process of a stack.

    ``command_lines`` run from the profiled process, of kind ``root`` (DAEMON
    or ZYGOTE), to the sampled one. They are empty when py-spy ran without
    --subprocesses. Raises ValueError for any other ``root``.
    """
    if root not in (DAEMON, ZYGOTE):
        raise ValueError(f"invalid root kind {root!r}: expected {DAEMON} or {ZYGOTE}")
    # 1 for the daemon, 2 for the zygote, 3 or more below it.
    depth = max(len(command_lines), 1) + (1 if root == ZYGOTE else 0)
    if depth == 1:
        return DAEMON
    if root == DAEMON and ZYGOTE_MODULE not in command_lines[1]:
        return OTHER
    if depth == 2:
        return ZYGOTE
    functions = {(frame.function, frame.file) for frame in frames}
    if ("_run_init", "engine/runtime/supervisor.py") in functions:
        return INIT
    if ("run", "engine/runtime/fileworker.py") in functions:
        return FILE_WORKER
    return SUPERVISOR


def own_frames(frames: list[Frame]) -> list[Frame]:
    """Return ``frames`` from the innermost entry frame (ENTRY_FRAMES) inward."""
    for index in range(len(frames) - 1, -1, -1):
        if (frames[index].function, frames[index].file) in ENTRY_FRAMES:
            return frames[index:]
    return frames


def aggregate(
    lines: Iterable[str], root: str = DAEMON, pid: int | None = None
) -> dict[str, KindProfile]:
    """Sum py-spy's raw lines per process kind; kinds without samples are absent.

    ``root`` is the kind of the process that py-spy profiled (process_kind),
    and ``pid`` its pid, which stacks without process frames are counted under.
    """
    profiles: dict[str, KindProfile] = {}
    for line in lines:
        parsed = parse_line(line)
        if parsed is None:
            continue
        processes, frames, count = parsed
        kind = process_kind([command for _, command in processes], frames, root)
        profile = profiles.setdefault(kind, KindProfile())
        profile.samples += count
        if processes:
            profile.pids.add(processes[-1][0])
        elif pid is not None:
            profile.pids.add(pid)
        counted = own_frames(frames)
        for frame in set(counted):
            profile.inclusive[frame] += count
        if counted:
            profile.self_samples[counted[-1]] += count
    return profiles
