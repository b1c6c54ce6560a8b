"""The `engine secret ...` commands, and `--secret` for `run` and `sandbox`."""

from __future__ import annotations

import argparse
import getpass
import sys
import time

from engine import errors
from engine.cli.common import print_json, print_table
from engine.core.secrets import MAX_VALUE_BYTES
from engine.sdk.client import resolve_address
from engine.sdk.secrets import SecretClient

SECRET_HELP = (
    "set secret NAME (see `engine secret create`) as the environment variable"
    " NAME; repeat for more"
)


def add_secret_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """Add the repeatable --secret NAME option to a command."""
    parser.add_argument("--secret", action="append", metavar="NAME", help=help_text)


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """Add `secret` to the main parser; ``common`` has the global options."""
    secret = subparsers.add_parser(
        "secret",
        parents=[common],
        help="store, list and remove secrets",
        description="Manage the daemon's secrets: named values that sandboxes"
        " receive as environment variables with `engine run --secret NAME`. The"
        " daemon never returns a value.",
    )
    commands = secret.add_subparsers(
        dest="secret_command", metavar="COMMAND", required=True
    )

    create = commands.add_parser(
        "create",
        parents=[common],
        help="store a secret read from stdin",
        description="Store secret NAME with the value read from stdin. From a"
        " terminal, one line is read without echo and its newline is not part of"
        " the value. From a pipe or a file, every byte up to the end of input is"
        " the value, a trailing newline included, so use `printf %s VALUE |` rather"
        " than `echo VALUE |`.",
    )
    create.add_argument(
        "name",
        metavar="NAME",
        help="secret name, which is also the environment variable's name: letters,"
        " digits and '_', not starting with a digit",
    )
    create.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the value if the secret exists (default: fail)",
    )
    create.set_defaults(func=create_command)

    listing = commands.add_parser(
        "ls",
        parents=[common],
        help="list secrets",
        description="List every secret's name and times; values are never shown.",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=ls_command)

    remove = commands.add_parser(
        "rm",
        parents=[common],
        help="delete secrets",
        description="Delete each secret NAME. Running sandboxes keep the values"
        " they received.",
    )
    remove.add_argument("names", metavar="NAME", nargs="+", help="secret name")
    remove.set_defaults(func=rm_command)


def _client(args: argparse.Namespace) -> SecretClient:
    return SecretClient(resolve_address(args.address, args.data_dir))


def read_value(stream: object = None) -> str:
    """Read a secret's value from stdin, as `engine secret create` documents."""
    stdin = stream if stream is not None else sys.stdin
    if stdin.isatty():  # type: ignore[attr-defined]
        return getpass.getpass("value: ")
    data = stdin.buffer.read(MAX_VALUE_BYTES + 1)  # type: ignore[attr-defined]
    if len(data) > MAX_VALUE_BYTES:
        raise errors.InvalidArgument(
            f"the value on stdin is longer than {MAX_VALUE_BYTES} bytes, the"
            " maximum for a secret; pass larger data through a file"
        )
    try:
        return data.decode()
    except UnicodeDecodeError as error:
        raise errors.InvalidArgument(
            f"the value on stdin is not valid UTF-8 (byte {error.start}); an"
            " environment variable's value must be text"
        ) from None


def create_command(args: argparse.Namespace) -> int:
    value = read_value()
    with _client(args) as client:
        info = client.create(args.name, value, overwrite=args.overwrite)
    print(info.name)
    return 0


def ls_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = client.list()
    if args.json:
        print_json(infos)
        return 0
    rows = [
        [
            info.name,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created_at)),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.updated_at)),
        ]
        for info in infos
    ]
    print_table(rows, ["NAME", "CREATED", "UPDATED"])
    return 0


def rm_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for name in args.names:
            client.delete(name)
            print(name)
    return 0
