"""py-spy recordings of engine processes, for benchmarks.profile.

py-spy (https://github.com/benfred/py-spy) samples the Python stacks of a
running process from outside it. It is one of the dev extras. ``recording``
also runs benchmarks.profile's ``perf record``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

INSTALL_COMMAND = ".venv/bin/python -m pip install -e '.[dev]'"
# Seconds py-spy may take to start sampling, and to write its output after
# SIGINT.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
# The line that py-spy writes once it samples.
PY_SPY_READY = "Sampling process"


@dataclass(frozen=True)
class Target:
    """A process for py-spy to record: its kind (stacks.DAEMON or ZYGOTE), its pid."""

    kind: str
    pid: int


@dataclass(frozen=True)
class Summary:
    """py-spy's own account of one recording, from its log."""

    samples: int
    errors: int
    # The largest "N s behind in sampling" that py-spy reported, in seconds.
    max_lag_seconds: float


def find_py_spy() -> str:
    """Return the path of py-spy beside this interpreter or on PATH.

    Raises SystemExit with the install command when there is none.
    """
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise SystemExit(
            f"error: py-spy not found in {beside.parent} or on PATH; install the"
            f" dev extras with `{INSTALL_COMMAND}`"
        )
    return found


def record_command(
    py_spy: str, target: Target, rate: int, idle: bool, output: Path
) -> list[str]:
    """Return the command line that records ``target`` as collapsed stacks.

    py-spy counts a thread as active when /proc gives its state as R
    (running or runnable). Its default blocking mode stops every thread with
    ptrace for each sample, which misleads that count. On an idle daemon,
    4 s at 500 Hz gave about 190 active samples in the blocking mode, most
    of them thread-pool workers waiting for work. With --nonblocking, which
    reads the stacks while the processes run, it gave at most 1 (py-spy
    0.4.3).
    """
    command = [
        py_spy,
        "record",
        "--pid",
        str(target.pid),
        "--function",
        "--nonblocking",
        "--format",
        "raw",
        "--rate",
        str(rate),
        "--output",
        str(output),
    ]
    if idle:
        command.append("--idle")
    return command


@contextlib.contextmanager
def recording(
    command: list[str], log_path: Path, ready_text: str | None = PY_SPY_READY
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a sampling profiler from the start of its sampling until the block ends.

    The block starts once ``ready_text`` is in the profiler's output, or at
    once when it is None. At exit the profiler gets SIGINT, on which py-spy
    and `perf record` write their output. py-spy then exits with status 0,
    and perf kills itself with the same SIGINT, so both count as success.
    Raises RuntimeError when the profiler does not start, or exits with a
    failure.
    """
    name = " ".join(Path(word).name for word in command[:2])
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    logger.debug("started %s, pid %d: %s", name, process.pid, " ".join(command))
    try:
        if ready_text is not None:
            _wait_for_sampling(name, process, log_path, ready_text)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            status = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.error("%s %d ignored SIGINT; killing it", name, process.pid)
            process.kill()
            status = process.wait()
    if status not in (0, -signal.SIGINT):
        raise RuntimeError(f"{name} exited with status {status}: {log_tail(log_path)}")


def _wait_for_sampling(
    name: str, process: subprocess.Popen[bytes], log_path: Path, ready_text: str
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if ready_text in log_path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with status {process.returncode} before sampling:"
                f" {log_tail(log_path)}"
            )
        time.sleep(0.05)
    raise RuntimeError(
        f"{name} did not start sampling within {START_TIMEOUT} s: {log_tail(log_path)}"
    )


def log_tail(path: Path, lines: int = 5) -> str:
    """Return the last ``lines`` lines of a profiler's log, joined by " | "."""
    text = path.read_text(errors="replace").strip()
    return " | ".join(text.splitlines()[-lines:]) or "(no output)"


def read_summary(log_path: Path) -> Summary:
    """Read the sample count, error count and largest lag from py-spy's log."""
    text = log_path.read_text(errors="replace")
    counts = re.findall(r"Samples: (\d+) Errors: (\d+)", text)
    lags = [float(lag) for lag in re.findall(r"([\d.]+)s behind in sampling", text)]
    samples, errors = (int(value) for value in counts[-1]) if counts else (0, 0)
    return Summary(samples, errors, max(lags, default=0.0))
