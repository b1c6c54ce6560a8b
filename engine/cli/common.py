"""Helpers shared by the CLI commands: option parsing, output and stdin forwarding."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from typing import IO, Any

from engine import errors

logger = logging.getLogger(__name__)

# Exit statuses of `engine run` and `engine sandbox exec` for a killed command,
# following timeout(1) and the shell's 128 + SIGKILL.
EXIT_TIMEOUT = 124
EXIT_OOM = 137


def fail(message: str) -> int:
    print(f"engine: error: {message}", file=sys.stderr)
    return 1


def parse_env(values: list[str] | None) -> dict[str, str]:
    """Parse repeated ``--env NAME=VALUE``; a bare NAME copies this process's value."""
    env: dict[str, str] = {}
    for item in values or []:
        name, separator, value = item.partition("=")
        if not name:
            raise errors.InvalidArgument(f"invalid --env {item!r}: expected NAME=VALUE")
        if not separator:
            if name not in os.environ:
                raise errors.InvalidArgument(
                    f"invalid --env {item!r}: expected NAME=VALUE, and {name} is not"
                    " set in this environment to copy"
                )
            value = os.environ[name]
        env[name] = value
    return env


def parse_labels(values: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values or []:
        key, separator, value = item.partition("=")
        if not key or not separator:
            raise errors.InvalidArgument(
                f"invalid --label {item!r}: expected KEY=VALUE"
            )
        labels[key] = value
    return labels


def parse_signal(value: str) -> int:
    """Return a signal number from "9", "KILL" or "SIGKILL"."""
    if value.isdigit():
        return int(value)
    name = value.upper()
    if not name.startswith("SIG"):
        name = f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise errors.InvalidArgument(
            f"invalid signal {value!r}: expected a number or a name such as"
            " TERM or SIGKILL"
        ) from None


def command_argv(values: list[str]) -> list[str]:
    """Return the command, raising InvalidArgument when it is missing."""
    if not values:
        raise errors.InvalidArgument(
            "missing command: put it after --, as in `engine run -- python3 -V`"
        )
    return values


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of a new sandbox that `run` and `sandbox create` share."""
    parser.add_argument(
        "--image",
        default="host",
        help="image of the sandbox's root filesystem (default: host)",
    )
    parser.add_argument(
        "--cpu",
        type=float,
        metavar="CORES",
        help="CPU limit in cores, fractions allowed, such as 0.5 (default: 1)",
    )
    parser.add_argument(
        "--memory",
        metavar="MIB",
        help="memory limit in MiB, or a size such as 512Mi or 1Gi (default: 512)",
    )
    parser.add_argument(
        "--disk",
        metavar="MIB",
        help="disk limit of the sandbox's writable layer in MiB, or a size such"
        " as 512Mi or 8Gi; /tmp and volumes do not count (default: 4096)",
    )
    parser.add_argument(
        "--pids",
        type=int,
        metavar="N",
        help="maximum number of processes and threads (default: 512)",
    )
    parser.add_argument(
        "--env",
        action="append",
        metavar="NAME=VALUE",
        help="environment variable of every process; repeat for more. A bare NAME"
        " copies its value from this environment",
    )
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        help="working directory inside the sandbox, an absolute path (default: /)",
    )


def write_output(stream: IO[bytes], data: bytes) -> IO[bytes]:
    """Write and flush ``data``; return the stream to use next.

    When the reader of our stdout or stderr has gone (a closed pipe), later
    output goes to /dev/null, so the command still runs to its end.
    """
    try:
        stream.write(data)
        stream.flush()
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    return stream


def to_json(value: Any) -> Any:
    """Convert dataclasses (and their enums) to JSON-ready dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: to_json(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if hasattr(value, "value") and isinstance(value, str):
        return value.value
    return value


def print_json(value: Any) -> None:
    json.dump(to_json(value), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [len(name) for name in header]
    for row in rows:
        widths = [
            max(width, len(cell)) for width, cell in zip(widths, row, strict=True)
        ]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


def forward_stdin(write: Any, close: Any) -> threading.Thread:
    """Copy this process's stdin to a sandbox process in a daemon thread."""

    def copy() -> None:
        try:
            stdin = sys.stdin.buffer
            while True:
                data = stdin.read1(65536)
                if not data:
                    break
                write(data)
            close()
        except errors.FailedPrecondition as error:
            # The process exited or closed its stdin first.
            logger.debug("stopped forwarding stdin: %s", error)
        except (errors.EngineError, OSError) as error:
            logger.warning("stopped forwarding stdin: %s", error)

    thread = threading.Thread(target=copy, name="engine-stdin", daemon=True)
    thread.start()
    return thread
