"""Samples of py-spy's and perf's stacks, summed by function.

``py-spy record --function --format raw`` writes one line per distinct
stack: the frames from the outermost to the innermost, joined by ";", then a
space and the number of samples. A sample is the stack of one thread at one
sampling tick. Every frame reads ``FUNCTION (FILE:LINE)``, where LINE is the
function's first line because of --function. benchmarks.profile runs one
py-spy per process, without --subprocesses, so every stack of a recording is
of that one process.

``perf script --show-task-events -F comm,pid,tid,ip,sym,dso`` of a
``perf record -a -g`` recording writes each sample as a header line ``COMM
PID/TID``, then one indented ``ADDRESS SYMBOL (OBJECT)`` line per frame from
the innermost outward, then a blank line. Task events take one line each,
such as ``COMM PID/TID PERF_RECORD_FORK(PID:TID):(PPID:PTID)``.
``perf_samples`` reads that text, and ``descendants`` uses its fork events to
find the processes below one pid.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

DAEMON = "daemon"
ZYGOTE = "zygote"

ZYGOTE_MODULE = "engine.runtime.zygote"
# (function, file) of the loop or entry function of each kind of thread. The
# frames that call the innermost of them in a stack are the same in every
# sample of that thread, so they are left out of the inclusive counts.
ENTRY_FRAMES = frozenset(
    {
        ("BaseEventLoop._run_once", "asyncio/base_events.py"),
        ("_worker", "concurrent/futures/thread.py"),
        ("Thread.run", "threading.py"),
        ("Zygote.serve", "engine/runtime/zygote.py"),
    }
)
_FRAME = re.compile(r"(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)")
_PERF_HEADER = re.compile(r"\s*(?P<comm>.*?)\s+(?P<pid>-?\d+)/(?P<tid>-?\d+)\s*")
_PERF_FORK = re.compile(r"PERF_RECORD_FORK\((\d+):\d+\):\((\d+):\d+\)")
# The object can contain parentheses: "/memfd:engine-init (deleted)".
_PERF_FRAME = re.compile(r"\s*[0-9a-f]+ (?P<symbol>.*?) \((?P<object>.*)\)")
KERNEL_OBJECT = "[kernel.kallsyms]"
# Frames of the x86-64 kernel's system call entry (arch/x86/entry), as
# Linux 6.18 names them.
SYSCALL_ENTRY = frozenset(
    {"entry_SYSCALL_64_after_hwframe", "do_syscall_64", "x64_sys_call"}
)
USER_SPACE = "(user space)"


@dataclass(frozen=True)
class Frame:
    """One frame of a stack: the function and where it is defined.

    For perf's frames, ``function`` is the symbol and ``file`` the object
    (the executable, library or ``[kernel.kallsyms]``), with no line.
    """

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
        ordered = sorted(
            ranked.items(),
            key=lambda item: (-item[1], item[0].location, item[0].function),
        )
        return [
            (frame, self.percent(samples), self.percent(other[frame]))
            for frame, samples in ordered[:count]
        ]

    def count(self, frames: list[Frame], samples: int, pid: int) -> None:
        """Add ``samples`` samples of one stack, outermost frame first."""
        self.samples += samples
        self.pids.add(pid)
        for frame in set(frames):
            self.inclusive[frame] += samples
        if frames:
            self.self_samples[frames[-1]] += samples

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


def parse_line(line: str) -> tuple[list[Frame], int] | None:
    """Split one raw line of py-spy into its frames and its sample count.

    Returns None for a blank line. Raises ValueError when the line does not
    end in a sample count.
    """
    line = line.rstrip("\n")
    if not line.strip():
        return None
    stack, _, count = line.rpartition(" ")
    if not count.isdigit():
        raise ValueError(f"invalid py-spy raw line, no sample count at the end: {line}")
    frames = [parse_frame(text) for text in stack.split(";") if text]
    return frames, int(count)


def own_frames(frames: list[Frame]) -> list[Frame]:
    """Return ``frames`` from the innermost entry frame (ENTRY_FRAMES) inward."""
    for index in range(len(frames) - 1, -1, -1):
        if (frames[index].function, frames[index].file) in ENTRY_FRAMES:
            return frames[index:]
    return frames


def aggregate(lines: Iterable[str], pid: int) -> KindProfile:
    """Sum the raw lines that py-spy recorded of process ``pid``."""
    profile = KindProfile()
    for line in lines:
        parsed = parse_line(line)
        if parsed is not None:
            frames, count = parsed
            profile.count(own_frames(frames), count, pid)
    return profile


@dataclass(frozen=True)
class PerfSample:
    """One sample of ``perf script``: the thread and its stack, outermost first."""

    comm: str
    pid: int
    tid: int
    frames: list[Frame]


def perf_samples(lines: Iterable[str]) -> Iterator[PerfSample | tuple[int, int]]:
    """Read ``perf script --show-task-events`` output (module docstring).

    Yields a PerfSample per sample and a (child pid, parent pid) pair per
    fork event of a new process. The fork events of new threads and the
    other task events are skipped. Raises ValueError on a frame line outside a sample
    or a header line that is neither a sample nor a task event.
    """
    header: re.Match[str] | None = None
    frames: list[Frame] = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if header is not None:
                yield _perf_sample(header, frames)
            header, frames = None, []
        elif line[0].isspace() and header is not None:
            frame = _PERF_FRAME.fullmatch(line)
            if frame is None:
                raise ValueError(f"invalid perf script frame line: {line!r}")
            frames.append(Frame(frame.group("symbol"), frame.group("object"), None))
        elif "PERF_RECORD_" in line:
            fork = _PERF_FORK.search(line)
            if fork is not None and fork.group(1) != fork.group(2):
                yield int(fork.group(1)), int(fork.group(2))
        else:
            match = _PERF_HEADER.fullmatch(line)
            if match is None:
                raise ValueError(f"invalid perf script sample line: {line!r}")
            header = match
    if header is not None:
        yield _perf_sample(header, frames)


def _perf_sample(header: re.Match[str], frames: list[Frame]) -> PerfSample:
    return PerfSample(
        header.group("comm"),
        int(header.group("pid")),
        int(header.group("tid")),
        frames[::-1],
    )


def kernel_stack(frames: list[Frame]) -> list[Frame]:
    """Return the kernel frames of a perf stack, and its innermost user frame.

    perf finds the callers of user code through frame pointers, which
    engine-init (gcc -O2) and Debian 12's packages are built without, so
    those callers are dropped. The sampled user-space
    function, innermost in a sample of user code, comes from the
    instruction pointer and is kept.
    """
    selected = [frame for frame in frames if frame.file == KERNEL_OBJECT]
    if frames and frames[-1].file != KERNEL_OBJECT:
        selected.append(frames[-1])
    return selected


def kernel_entry(frames: list[Frame]) -> str:
    """Return how a perf sample entered the kernel, or USER_SPACE.

    That is the outermost kernel function below SYSCALL_ENTRY: the system
    call's ``__x64_sys_*`` function, or what a system call that the compiler
    inlined into x64_sys_call calls first. Page faults, interrupts and the
    first return of a new task have no SYSCALL_ENTRY frames, so their entry
    function is returned, such as ``asm_exc_page_fault``.
    """
    for frame in frames:
        if frame.file == KERNEL_OBJECT and frame.function not in SYSCALL_ENTRY:
            return frame.function
    return USER_SPACE


def descendants(parents: dict[int, int], roots: Iterable[int]) -> set[int]:
    """Return the pids below any of ``roots`` in a child pid -> parent pid map.

    The roots themselves are left out, unless one is below another.
    """
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    pending = [child for root in roots for child in children.get(root, [])]
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending.extend(children.get(pid, []))
    return found
