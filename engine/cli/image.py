"""The ``engine image`` subcommands: build, ls and rm."""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path
from typing import TextIO

from engine.config import default_data_dir
from engine.errors import EngineError
from engine.storage.images import DEFAULT_SUITE, ImageInfo, ImageStore


def register(
    subparsers: argparse._SubParsersAction,
    common: argparse.ArgumentParser | None = None,
) -> None:
    """Add ``image`` and its subcommands to the main parser's subparsers.

    Each subcommand stores its handler in ``args.func``. A handler takes the
    parsed arguments (with the global ``data_dir``) and returns the exit status.
    ``common``, if given, is a parent parser whose options (such as
    ``--data-dir``) each subcommand also accepts after its name.
    """
    parents = [common] if common is not None else []
    image = subparsers.add_parser(
        "image",
        parents=parents,
        help="build, list and remove sandbox images",
        description="Manage the read-only images that sandbox root filesystems are "
        "made from. The built-in 'host' image needs no build.",
    )
    commands = image.add_subparsers(
        dest="image_command", metavar="COMMAND", required=True
    )

    build = commands.add_parser(
        "build",
        parents=parents,
        help="build an image from its recipe (requires root)",
        description="Build an image with debootstrap and shift its files into the "
        "sandbox uid range. Requires root, debootstrap and network access to a Debian "
        "mirror.",
    )
    build.add_argument(
        "name", metavar="NAME", help="image to build; 'debian' is the only recipe"
    )
    build.add_argument(
        "--suite",
        default=DEFAULT_SUITE,
        help=f"Debian suite (codename) to install (default: {DEFAULT_SUITE})",
    )
    build.add_argument(
        "--mirror",
        metavar="URL",
        help="Debian archive URL to download from (default: the first Debian deb URL "
        "in /etc/apt/sources.list and /etc/apt/sources.list.d)",
    )
    build.set_defaults(func=build_command)

    ls = commands.add_parser(
        "ls",
        parents=parents,
        help="list images",
        description="List the host image and every built image with its size and "
        "creation time.",
    )
    ls.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array of objects (name, kind, size_bytes, created_at, path) "
        "instead of a table",
    )
    ls.set_defaults(func=ls_command)

    rm = commands.add_parser(
        "rm",
        parents=parents,
        help="remove a built image",
        description="Delete a built image. The 'host' image cannot be removed.",
    )
    rm.add_argument("name", metavar="NAME", help="image to remove")
    rm.set_defaults(func=rm_command)


def build_command(args: argparse.Namespace) -> int:
    """Build ``args.name`` and print its size, showing progress on stderr."""
    display = ProgressDisplay(sys.stderr)
    try:
        info = _store(args).build(
            args.name, progress=display.show, suite=args.suite, mirror=args.mirror
        )
    except EngineError as error:
        display.finish()
        return _fail(str(error))
    except OSError as error:
        display.finish()
        return _fail(_describe_os_error(error))
    except KeyboardInterrupt:
        display.finish()
        _fail(f"build of image {args.name!r} interrupted; nothing was kept")
        return 130
    display.finish()
    print(f"built image {info.name} ({_format_size(info.size_bytes)}) at {info.path}")
    return 0


def ls_command(args: argparse.Namespace) -> int:
    """Print the images as a table or, with ``--json``, as JSON."""
    try:
        images = _store(args).list()
    except EngineError as error:
        return _fail(str(error))
    except OSError as error:
        return _fail(_describe_os_error(error))
    if args.json:
        rows = [
            {
                "name": info.name,
                "kind": info.kind,
                "size_bytes": info.size_bytes,
                "created_at": info.created_at,
                "path": str(info.path),
            }
            for info in images
        ]
        print(json.dumps(rows, indent=2))
        return 0
    _print_table(images, sys.stdout)
    return 0


def rm_command(args: argparse.Namespace) -> int:
    """Remove ``args.name``."""
    try:
        _store(args).remove(args.name)
    except EngineError as error:
        return _fail(str(error))
    except OSError as error:
        return _fail(_describe_os_error(error))
    print(f"removed image {args.name}")
    return 0


class ProgressDisplay:
    """One-line progress on a terminal, or one line per step otherwise.

    On a TTY each step overwrites the previous one, cut to the terminal width.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.dirty = False

    def show(self, text: str) -> None:
        """Display one progress step."""
        if self.tty:
            width = shutil.get_terminal_size().columns
            # "\r\x1b[2K" moves to the start of the line and clears it.
            self.stream.write("\r\x1b[2K" + text[: max(width - 1, 1)])
            self.dirty = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the in-place line, so later output starts on a fresh line."""
        if self.dirty:
            self.stream.write("\n")
            self.stream.flush()
            self.dirty = False


def _store(args: argparse.Namespace) -> ImageStore:
    data_dir = getattr(args, "data_dir", None)
    return ImageStore(Path(data_dir) if data_dir else default_data_dir())


def _fail(message: str) -> int:
    print(f"engine: error: {message}", file=sys.stderr)
    return 1


def _describe_os_error(error: OSError) -> str:
    if error.filename is not None:
        return f"{error.strerror}: {error.filename}"
    return str(error)


def _print_table(images: list[ImageInfo], stream: TextIO) -> None:
    rows = [("NAME", "KIND", "SIZE", "CREATED", "PATH")]
    for info in images:
        if info.created_at:
            created = datetime.datetime.fromtimestamp(info.created_at).strftime(
                "%Y-%m-%d %H:%M"
            )
        else:
            created = "-"
        rows.append(
            (
                info.name,
                info.kind,
                _format_size(info.size_bytes),
                created,
                str(info.path),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[4]]), file=stream)


def _format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
