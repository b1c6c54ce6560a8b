"""Named secrets in the Engine's SQLite store, handed to sandboxes as env vars.

A secret's name is also the name of the environment variable it becomes, so
names follow the rules of a shell variable. Values are stored in plain text
in the database file, which only root can read (mode 0600 in a data dir that
sandboxes cannot list). No method returns a value except ``resolve``, which
the Engine calls to build a process's environment.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from engine.core.tenancy import current_workspace
from engine.errors import AlreadyExists, InvalidArgument, NotFound

MAX_NAME_CHARS = 128
# A value ends up in one NAME=value string of execve, which the kernel limits
# to 128 KiB (MAX_ARG_STRLEN); 64 KiB leaves room for the name and for the
# other variables.
MAX_VALUE_BYTES = 64 * 1024
# Secrets one sandbox or one exec may list.
MAX_SECRETS_PER_REQUEST = 64
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    workspace TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (workspace, name)
);
"""


@dataclass(frozen=True)
class SecretInfo:
    """A secret's name and times (seconds since the epoch), never its value."""

    name: str
    created_at: float
    updated_at: float


def check_name(name: str) -> None:
    """Raise InvalidArgument unless ``name`` can be an environment variable name."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument(
            "missing secret name: use letters, digits and '_', not starting with a"
            " digit, such as API_TOKEN"
        )
    if len(name) > MAX_NAME_CHARS or not _NAME.match(name):
        display = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidArgument(
            f"invalid secret name {display!r}: use 1 to {MAX_NAME_CHARS} ASCII"
            " letters, digits and '_', not starting with a digit, such as API_TOKEN"
        )


def check_value(name: str, value: str) -> None:
    """Raise InvalidArgument for a value that cannot be an environment variable.

    The message names the secret and the problem, never the value.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"invalid value of secret {name!r}: expected a string")
    if "\0" in value:
        raise InvalidArgument(
            f"invalid value of secret {name!r}: it contains a NUL byte, which an"
            " environment variable cannot hold"
        )
    size = len(value.encode())
    if size > MAX_VALUE_BYTES:
        raise InvalidArgument(
            f"invalid value of secret {name!r}: {size} bytes, but the maximum is"
            f" {MAX_VALUE_BYTES} bytes; pass larger data through a file"
        )


def check_names(field: str, names: Iterable[str]) -> tuple[str, ...]:
    """Check a list of secret names from a request; return it without duplicates."""
    result = tuple(dict.fromkeys(names))
    if len(result) > MAX_SECRETS_PER_REQUEST:
        raise InvalidArgument(
            f"{field} lists {len(result)} secrets; the maximum is"
            f" {MAX_SECRETS_PER_REQUEST}"
        )
    for name in result:
        check_name(name)
    return result


class SecretStore:
    """The ``secrets`` table of the Engine's database.

    Every method acts on the secrets of the current workspace only.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)

    def create(
        self, name: str, value: str, *, overwrite: bool = False
    ) -> tuple[SecretInfo, bool]:
        """Store a secret; return it and whether it is new.

        Raises AlreadyExists when ``name`` is taken, unless ``overwrite``.
        """
        check_name(name)
        check_value(name, value)
        now = time.time()
        workspace = current_workspace()
        row = self.db.execute(
            "SELECT created_at FROM secrets WHERE workspace = ? AND name = ?",
            (workspace, name),
        ).fetchone()
        if row is not None and not overwrite:
            raise AlreadyExists(
                f"secret {name!r} already exists; delete it first or pass overwrite"
                " (`engine secret create --overwrite`)"
            )
        if row is None:
            try:
                self.db.execute(
                    "INSERT INTO secrets VALUES (?, ?, ?, ?, ?)",
                    (workspace, name, value, now, now),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"secret {name!r} already exists") from None
            return SecretInfo(name, now, now), True
        self.db.execute(
            "UPDATE secrets SET value = ?, updated_at = ?"
            " WHERE workspace = ? AND name = ?",
            (value, now, workspace, name),
        )
        return SecretInfo(name, row[0], now), False

    def list(self) -> list[SecretInfo]:
        rows = self.db.execute(
            "SELECT name, created_at, updated_at FROM secrets WHERE workspace = ?"
            " ORDER BY name",
            (current_workspace(),),
        )
        return [SecretInfo(*row) for row in rows]

    def delete(self, name: str) -> None:
        check_name(name)
        cursor = self.db.execute(
            "DELETE FROM secrets WHERE workspace = ? AND name = ?",
            (current_workspace(), name),
        )
        if cursor.rowcount == 0:
            raise NotFound(f"secret {name!r} not found; `engine secret ls` lists them")

    def resolve(self, names: Iterable[str]) -> dict[str, str]:
        """Return the values of ``names``; NotFound names every missing secret."""
        names = tuple(names)
        if not names:
            return {}
        placeholders = ", ".join("?" * len(names))
        rows = self.db.execute(
            "SELECT name, value FROM secrets WHERE workspace = ?"
            f" AND name IN ({placeholders})",
            (current_workspace(), *names),
        )
        values = dict(rows.fetchall())
        missing = [name for name in names if name not in values]
        if missing:
            listed = ", ".join(repr(name) for name in missing)
            noun = "secret" if len(missing) == 1 else "secrets"
            raise NotFound(
                f"{noun} {listed} not found; create it with `engine secret create"
                f" {missing[0]}` or remove it from the request"
            )
        return {name: values[name] for name in names}
