"""The `engine token ...` commands: API tokens in the data dir's database.

They open the database directly rather than calling the daemon, because only
the host's root, who can read the data dir, may create or revoke tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sqlite3
from collections.abc import Iterator

from engine import errors
from engine.cli.common import print_json, print_table
from engine.config import Config
from engine.core.tenancy import DEFAULT_WORKSPACE
from engine.core.tokens import TokenStore


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """Add `token` to the main parser; ``common`` has the global options."""
    token = subparsers.add_parser(
        "token",
        parents=[common],
        help="create, list and revoke API tokens",
        description="Manage the bearer tokens that the gRPC TCP listener"
        " (`engine serve --listen`) and the HTTP routes (`--http`) require. Each"
        " token acts for one workspace. Only a token's SHA-256 is stored, so a"
        " token cannot be shown again after `create`.",
    )
    commands = token.add_subparsers(dest="token_command", required=True)

    create = commands.add_parser(
        "create",
        parents=[common],
        help="create a token and print it alone on stdout",
    )
    create.add_argument(
        "--workspace",
        default=DEFAULT_WORKSPACE,
        help=f"workspace the token acts for (default: {DEFAULT_WORKSPACE})",
    )
    create.set_defaults(func=create_command)

    ls = commands.add_parser(
        "ls", parents=[common], help="list token ids, workspaces and creation times"
    )
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=ls_command)

    rm = commands.add_parser(
        "rm",
        parents=[common],
        help="revoke tokens by the ids that `engine token ls` prints",
    )
    rm.add_argument("token_ids", metavar="ID", nargs="+")
    rm.set_defaults(func=rm_command)


@contextlib.contextmanager
def _tokens(args: argparse.Namespace) -> Iterator[TokenStore]:
    config = Config.from_data_dir(args.data_dir)
    if not config.database_path.is_file():
        raise errors.NotFound(
            f"no engine database at {config.database_path}; pass the --data-dir"
            " of the daemon the token is for, or start `engine serve` there once"
        )
    db = sqlite3.connect(config.database_path, isolation_level=None, timeout=10)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        yield TokenStore(db)
    finally:
        db.close()


def create_command(args: argparse.Namespace) -> int:
    with _tokens(args) as tokens:
        token = tokens.create(args.workspace)
    print(token)
    return 0


def ls_command(args: argparse.Namespace) -> int:
    with _tokens(args) as tokens:
        infos = tokens.list()
    if args.json:
        print_json(infos)
        return 0
    rows = [
        [
            info.token_id,
            info.workspace,
            datetime.datetime.fromtimestamp(info.created_at).isoformat(
                sep=" ", timespec="seconds"
            ),
        ]
        for info in infos
    ]
    print_table(rows, ["ID", "WORKSPACE", "CREATED"])
    return 0


def rm_command(args: argparse.Namespace) -> int:
    with _tokens(args) as tokens:
        for token_id in args.token_ids:
            tokens.delete(token_id)
            print(token_id)
    return 0
