"""API tokens: random secrets that each grant one workspace, stored as hashes.

A token is 32 random bytes in URL-safe base64. The database keeps only its
SHA-256, so a copy of the database grants nothing. Lookups go by the hash, so
their timing depends on the hash and not on the token; the final comparison
is constant-time as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass

from engine.core.tenancy import DEFAULT_WORKSPACE, check_workspace
from engine.errors import NotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    hash TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""
TOKEN_BYTES = 32
# Characters of the hash that identify a token in listings and in `rm`.
TOKEN_ID_CHARS = 12


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """A stored token: the start of its hash as its id, and its workspace."""

    token_id: str
    workspace: str
    created_at: float


class TokenStore:
    """Tokens in the engine's SQLite database."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def create(self, workspace: str = DEFAULT_WORKSPACE) -> str:
        """Create a token for ``workspace`` and return it; only its hash is kept."""
        check_workspace(workspace)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        self.db.execute(
            "INSERT INTO api_tokens VALUES (?, ?, ?)",
            (hash_token(token), workspace, time.time()),
        )
        return token

    def workspace_of(self, token: str) -> str | None:
        """Return the workspace of ``token``, or None when it is unknown."""
        digest = hash_token(token)
        row = self.db.execute(
            "SELECT hash, workspace FROM api_tokens WHERE hash = ?", (digest,)
        ).fetchone()
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        return row[1]

    def list(self) -> list[TokenInfo]:
        rows = self.db.execute(
            "SELECT hash, workspace, created_at FROM api_tokens ORDER BY created_at"
        ).fetchall()
        return [TokenInfo(row[0][:TOKEN_ID_CHARS], row[1], row[2]) for row in rows]

    def delete(self, token_id: str) -> None:
        """Delete the token whose hash starts with ``token_id``.

        Raises NotFound unless exactly one token matches.
        """
        if len(token_id) < TOKEN_ID_CHARS or not all(
            c in "0123456789abcdef" for c in token_id
        ):
            raise NotFound(
                f"token id {token_id!r} not found; `engine token ls` lists the"
                f" ids ({TOKEN_ID_CHARS} hex characters)"
            )
        rows = self.db.execute(
            "SELECT hash FROM api_tokens WHERE substr(hash, 1, ?) = ?",
            (len(token_id), token_id),
        ).fetchall()
        if len(rows) != 1:
            raise NotFound(
                f"token id {token_id!r} not found; `engine token ls` lists the ids"
            )
        self.db.execute("DELETE FROM api_tokens WHERE hash = ?", (rows[0][0],))
