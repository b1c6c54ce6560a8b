"""The `engine fs ...` commands: files and directories of a running sandbox.

Each command connects to the daemon, runs one or two calls of ``sb.fs`` and
prints the result. A LOCAL argument of "-" means this process's stdin (put)
or stdout (get).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import stat
import sys

from engine import errors
from engine.cli.common import print_json, print_table
from engine.core.files import FileInfo
from engine.sdk.client import resolve_address
from engine.sdk.sandbox import Sandbox, SandboxInstance

STDIO = "-"
_TYPE_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "other": 0,
}


def parse_mode(value: str) -> int:
    """Parse an octal mode such as 644, 0644 or 0o644 into an int."""
    digits = value.lower().removeprefix("0o")
    try:
        mode = int(digits, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid mode {value!r}: expected octal permission bits such as 0644"
        ) from None
    if not 0 <= mode <= 0o7777 or digits.startswith(("-", "+")):
        raise argparse.ArgumentTypeError(
            f"invalid mode {value!r}: expected octal permission bits from 0 to 7777"
        )
    return mode


# ------------------------------------------------------------------ parsers


def _sandbox_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sandbox_id", metavar="SANDBOX", help="sandbox id, sb-...")


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """Add `fs` to the main parser; ``common`` has the global options."""
    fs = subparsers.add_parser(
        "fs",
        parents=[common],
        help="copy, list and change files inside a running sandbox",
        description="Work with the files of a running sandbox. Paths are resolved"
        " inside the sandbox, relative ones against its workdir.",
    )
    commands = fs.add_subparsers(dest="fs_command", metavar="COMMAND", required=True)

    put = commands.add_parser(
        "put",
        parents=[common],
        help="copy a local file into a sandbox",
        description="Copy LOCAL (or stdin for -) to REMOTE in the sandbox. REMOTE"
        " appears atomically, with exactly --mode, once every byte is written.",
    )
    _sandbox_argument(put)
    put.add_argument("local", metavar="LOCAL", help="local file, or - for stdin")
    put.add_argument("remote", metavar="REMOTE", help="path inside the sandbox")
    put.add_argument(
        "--mode",
        type=parse_mode,
        default=0o644,
        help="octal permission bits of REMOTE (default: 0644)",
    )
    put.add_argument(
        "-p",
        "--parents",
        action="store_true",
        help="create missing parent directories of REMOTE",
    )
    put.set_defaults(func=put_command)

    get = commands.add_parser(
        "get",
        parents=[common],
        help="copy a file out of a sandbox",
        description="Copy REMOTE from the sandbox to LOCAL (or stdout for -)."
        " LOCAL is replaced only once the whole file has arrived.",
    )
    _sandbox_argument(get)
    get.add_argument("remote", metavar="REMOTE", help="path inside the sandbox")
    get.add_argument("local", metavar="LOCAL", help="local file, or - for stdout")
    get.set_defaults(func=get_command)

    listing = commands.add_parser(
        "ls",
        parents=[common],
        help="list a directory",
        description="List directory PATH in the sandbox: mode, owner, size,"
        " modification time and name.",
    )
    _sandbox_argument(listing)
    listing.add_argument(
        "path", metavar="PATH", nargs="?", default=".", help="directory (default: .)"
    )
    listing.add_argument(
        "-r", "--recursive", action="store_true", help="list the whole tree"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=ls_command)

    status = commands.add_parser(
        "stat",
        parents=[common],
        help="print the metadata of a path",
        description="Print the metadata of PATH, without following a final symlink.",
    )
    _sandbox_argument(status)
    status.add_argument("path", metavar="PATH", help="path inside the sandbox")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=stat_command)

    remove = commands.add_parser(
        "rm",
        parents=[common],
        help="delete a file, or with -r a directory tree",
        description="Delete PATH. A directory needs -r, which deletes its contents"
        " too; symlinks are deleted, never followed.",
    )
    _sandbox_argument(remove)
    remove.add_argument("path", metavar="PATH", help="path inside the sandbox")
    remove.add_argument(
        "-r", "--recursive", action="store_true", help="delete directories too"
    )
    remove.set_defaults(func=rm_command)

    make = commands.add_parser(
        "mkdir",
        parents=[common],
        help="create a directory",
        description="Create directory PATH with exactly --mode.",
    )
    _sandbox_argument(make)
    make.add_argument("path", metavar="PATH", help="path inside the sandbox")
    make.add_argument(
        "--mode",
        type=parse_mode,
        default=0o755,
        help="octal permission bits (default: 0755)",
    )
    make.add_argument(
        "-p",
        "--parents",
        action="store_true",
        help="create missing parents, and accept an existing directory",
    )
    make.set_defaults(func=mkdir_command)

    move = commands.add_parser(
        "mv",
        parents=[common],
        help="rename a file or directory",
        description="Rename SOURCE to DESTINATION, replacing a file there.",
    )
    _sandbox_argument(move)
    move.add_argument("source", metavar="SOURCE", help="path inside the sandbox")
    move.add_argument("destination", metavar="DESTINATION", help="new path")
    move.set_defaults(func=mv_command)

    change = commands.add_parser(
        "chmod",
        parents=[common],
        help="set the permission bits of a path",
        description="Set the permission bits of PATH to MODE, an octal number.",
    )
    _sandbox_argument(change)
    change.add_argument("mode", metavar="MODE", type=parse_mode, help="such as 0640")
    change.add_argument("path", metavar="PATH", help="path inside the sandbox")
    change.set_defaults(func=chmod_command)

    find = commands.add_parser(
        "find",
        parents=[common],
        help="search files for a regular expression",
        description="Print PATH:LINE:COLUMN:TEXT for each match of PATTERN, a"
        " Python regular expression, in the lines of the files under PATH."
        " COLUMN is the byte offset from 1. Binary files are skipped.",
    )
    _sandbox_argument(find)
    find.add_argument("path", metavar="PATH", help="file or directory")
    find.add_argument("pattern", metavar="PATTERN", help="regular expression")
    find.add_argument(
        "--max",
        type=int,
        default=10_000,
        metavar="N",
        help="stop after N matches, at most 10000 (default: 10000)",
    )
    find.add_argument("--json", action="store_true", help="print JSON")
    find.set_defaults(func=find_command)

    replace = commands.add_parser(
        "replace",
        parents=[common],
        help="replace a regular expression in files",
        description="Replace every match of PATTERN by REPLACEMENT (\\1 and"
        " \\g<name> insert groups) in the files under PATH, and print each changed"
        " path. Files without a match are not touched.",
    )
    _sandbox_argument(replace)
    replace.add_argument("path", metavar="PATH", help="file or directory")
    replace.add_argument("pattern", metavar="PATTERN", help="regular expression")
    replace.add_argument("replacement", metavar="REPLACEMENT", help="new text")
    replace.set_defaults(func=replace_command)


# ------------------------------------------------------------------ helpers


def _connect(args: argparse.Namespace) -> SandboxInstance:
    return Sandbox.connect(
        args.sandbox_id, address=resolve_address(args.address, args.data_dir)
    )


def _display(name: str) -> str:
    """Return ``name`` printable: each byte that is not UTF-8 becomes \\xNN."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def _mode_string(info: FileInfo) -> str:
    return stat.filemode(_TYPE_BITS.get(info.type, 0) | info.mode)


def _time_string(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M")


def _file_row(info: FileInfo, recursive: bool) -> list[str]:
    name = _display(info.path if recursive else info.name)
    if info.is_symlink:
        name = f"{name} -> {_display(info.target)}"
    return [
        _mode_string(info),
        str(info.uid),
        str(info.gid),
        str(info.size),
        _time_string(info.mtime),
        name,
    ]


# ----------------------------------------------------------------- commands


def put_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args)
    try:
        if args.local == STDIO:
            sandbox.fs.upload_fileobj(
                sys.stdin.buffer, args.remote, args.mode, parents=args.parents
            )
        else:
            sandbox.fs.upload_file(
                args.local, args.remote, args.mode, parents=args.parents
            )
    finally:
        sandbox.close()
    return 0


def get_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args)
    try:
        if args.local == STDIO:
            sys.stdout.flush()
            sandbox.fs.download_fileobj(args.remote, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        else:
            sandbox.fs.download_file(args.remote, args.local)
    finally:
        sandbox.close()
    return 0


def ls_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args)
    try:
        entries = sandbox.fs.list_files(args.path, recursive=args.recursive)
    finally:
        sandbox.close()
    if args.json:
        print_json(list(entries))
    else:
        rows = [_file_row(info, args.recursive) for info in entries]
        print_table(rows, ["MODE", "UID", "GID", "SIZE", "MODIFIED", "NAME"])
    if entries.truncated:
        print(
            f"engine: warning: the listing stopped after {len(entries)} entries",
            file=sys.stderr,
        )
    return 0


def stat_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args)
    try:
        info = sandbox.fs.stat_file(args.path)
    finally:
        sandbox.close()
    if args.json:
        print_json(info)
        return 0
    for field in dataclasses.fields(info):
        value = getattr(info, field.name)
        if field.name == "mode":
            value = f"{value:04o} ({_mode_string(info)})"
        elif field.name == "mtime":
            value = f"{value:.6f} ({_time_string(value)})"
        elif isinstance(value, str):
            value = _display(value)
        print(f"{field.name:<7} {value}")
    return 0


def rm_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args)
    try:
        info = sandbox.fs.stat_file(args.path)
        if not info.is_dir:
            sandbox.fs.delete_file(args.path)
        elif args.recursive:
            sandbox.fs.delete_directory(args.path, recursive=True)
        else:
            raise errors.InvalidArgument(
                f"{args.path!r} is a directory; pass -r to delete it with its contents"
            )
    finally:
        sandbox.close()
    return 0


def mkdir_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args)
    try:
        sandbox.fs.create_directory(args.path, args.mode, parents=args.parents)
    finally:
        sandbox.close()
    return 0


def mv_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args)
    try:
        sandbox.fs.move(args.source, args.destination)
    finally:
        sandbox.close()
    return 0


def chmod_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args)
    try:
        sandbox.fs.chmod(args.path, args.mode)
    finally:
        sandbox.close()
    return 0


def find_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args)
    try:
        matches = sandbox.fs.find_in_files(
            args.path, args.pattern, max_matches=args.max
        )
    finally:
        sandbox.close()
    if args.json:
        print_json({"matches": list(matches), "truncated": matches.truncated})
        return 0
    for match in matches:
        print(f"{_display(match.path)}:{match.line}:{match.column}:{match.text}")
    if matches.truncated:
        print(
            f"engine: warning: the search stopped after {len(matches)} matches",
            file=sys.stderr,
        )
    return 0


def replace_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args)
    try:
        changed = sandbox.fs.replace_in_files(args.path, args.pattern, args.replacement)
    finally:
        sandbox.close()
    for path in changed:
        print(_display(path))
    return 0
