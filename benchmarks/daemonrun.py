"""Shared parts of the benchmarks that drive one `engine serve` daemon at scale.

Each of benchmarks.memory, .density, .load and .neighbours starts a real
daemon on a private data dir under a temporary work dir and talks to it over
gRPC on its unix socket. Each prints a Markdown section, which
``--update-docs`` writes between the module's markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from benchmarks.engines import Daemon, requires_root_reason
from benchmarks.machine import describe_machine, machine_summary, own_cgroup_dirs
from benchmarks.report import replace_section
from engine.sdk.client import Client

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"
# Directory of the daemon logs kept after each run, named <module>-<timestamp>.log.
LOG_DIR = ROOT / "benchmarks" / "results"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --work-dir, --update-docs, --docs and --log-level to ``parser``."""
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp"),
        metavar="DIR",
        help="parent of the temporary dir for the daemon's data dir and socket;"
        " its parents must be searchable by others (o+x) (default: /tmp)",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="replace this benchmark's section of --docs with the report",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=DEFAULT_DOCS,
        metavar="PATH",
        help=f"Markdown file that --update-docs rewrites (default: {DEFAULT_DOCS})",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="minimum level of the benchmark's log lines on stderr (default: INFO)",
    )


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("benchmarks").setLevel(level)


def load_average() -> float:
    """Return the 1-minute load average."""
    return os.getloadavg()[0]


def header(module: str, argv: list[str], load_before: float) -> str:
    """Return the command, machine and load average lines of a report."""
    command = " ".join(["python", "-m", module, *argv])
    return (
        f"Command: `{command}`.\n\n"
        f"Machine: {machine_summary(describe_machine())}.\n\n"
        f"One-minute load average: {load_before:.1f} before the run,"
        f" {load_average():.1f} after it.\n"
    )


def write_section(
    docs: Path, start: str, end: str, markdown: str, update: bool
) -> None:
    """Print ``markdown`` and, with ``update``, write it between the markers."""
    print(markdown)
    if update:
        replace_section(docs, start, end, markdown, f"\n{start}\n{end}\n")
        logger.info("updated the section %s of %s", start, docs)


def check_root() -> None:
    reason = requires_root_reason()
    if reason:
        raise SystemExit(f"error: {reason}; run it with sudo")


@contextlib.contextmanager
def running_daemon(
    work_dir: Path, name: str = "daemon", extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[Daemon, Client]]:
    """Start a daemon on a new data dir in ``work_dir``; yield it and a client.

    ``extra_args`` are more `engine serve` options, such as ("--warm-pool", "0").

    At exit the daemon gets SIGTERM, which terminates every sandbox still
    running. Any process still below this one is then killed by pid, the
    daemon's log is copied to LOG_DIR/<name>-<timestamp>.log, and the
    temporary dir is removed. Raises RuntimeError when the daemon exits with
    a status other than 0 or something is left behind.
    """
    directory = Path(tempfile.mkdtemp(prefix="engine-bench-", dir=work_dir))
    # The sandboxes' mapped uids must traverse it to reach the data dir.
    directory.chmod(0o755)
    daemon = Daemon(directory / "daemon", extra_args)
    client: Client | None = None
    problems = []
    try:
        daemon.start()
        client = Client(daemon.address)
        yield daemon, client
    finally:
        if client is not None:
            client.close()
        status = daemon.stop()
        if daemon.serving and status != 0:
            problems.append(
                f"engine serve exited with status {status}; log: {daemon.log_tail(5)}"
            )
        problems += _stop_leftover_children()
        problems += [
            f"left behind: cgroup {path}" for path in engine_cgroup_roots(daemon)
        ]
        _keep_log(daemon, name)
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            problems.append(f"left behind: {directory}")
    if problems:
        raise RuntimeError("; ".join(problems))


def engine_cgroup_roots(daemon: Daemon) -> list[str]:
    """Return the daemon's engine root cgroups that exist beneath this process's.

    The Engine names its root engine-<first 8 hex digits of the SHA-256 of
    the data dir's path> (Engine.start) in every hierarchy it uses.
    """
    digest = hashlib.sha256(str(daemon.data_dir.absolute()).encode()).hexdigest()
    name = f"engine-{digest[:8]}"
    return [
        os.path.join(parent, name)
        for parent in own_cgroup_dirs()
        if os.path.isdir(os.path.join(parent, name))
    ]


def _keep_log(daemon: Daemon, name: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = LOG_DIR / f"{name}-{stamp}.log"
    try:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(daemon.log_path, target)
    except OSError as error:
        logger.warning("failed to copy the daemon log to %s: %s", target, error)
        return
    logger.info("daemon log: %s", target)


def _stop_leftover_children() -> list[str]:
    """Kill the processes still below this one, by pid, and describe them."""
    found = []
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(f"left behind: process {child.pid} ({child.name()})")
            child.send_signal(signal.SIGKILL)
    psutil.wait_procs(children, timeout=10)
    return found
