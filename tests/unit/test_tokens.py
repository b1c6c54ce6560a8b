"""TokenStore against a real SQLite database."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.core.tokens import TOKEN_ID_CHARS, TokenStore, hash_token
from engine.errors import InvalidArgument, NotFound


@pytest.fixture
def tokens(tmp_path: Path) -> Iterator[TokenStore]:
    db = sqlite3.connect(tmp_path / "engine.db", isolation_level=None)
    try:
        yield TokenStore(db)
    finally:
        db.close()


def test_token_maps_to_workspace(tokens: TokenStore) -> None:
    token = tokens.create("team")
    assert tokens.workspace_of(token) == "team"


def test_unknown_tokens_rejected(tokens: TokenStore) -> None:
    token = tokens.create("team")
    assert tokens.workspace_of(token + "x") is None
    assert tokens.workspace_of("") is None


def test_only_hash_stored(tokens: TokenStore) -> None:
    token = tokens.create()
    stored = tokens.db.execute("SELECT hash, workspace FROM api_tokens").fetchall()
    assert stored == [(hash_token(token), "default")]


def test_tokens_are_distinct(tokens: TokenStore) -> None:
    assert tokens.create() != tokens.create()


def test_bad_workspace_rejected(tokens: TokenStore) -> None:
    with pytest.raises(InvalidArgument, match="invalid workspace 'Bad Space'"):
        tokens.create("Bad Space")


def test_list_shows_ids_not_tokens(tokens: TokenStore) -> None:
    token = tokens.create("team")
    [info] = tokens.list()
    assert info.token_id == hash_token(token)[:TOKEN_ID_CHARS]
    assert info.workspace == "team"
    assert token not in info.token_id


def test_delete_revokes(tokens: TokenStore) -> None:
    token = tokens.create("team")
    tokens.delete(tokens.list()[0].token_id)
    assert tokens.workspace_of(token) is None
    assert tokens.list() == []


@pytest.mark.parametrize("token_id", ["", "abc", "z" * TOKEN_ID_CHARS, "0" * 12])
def test_delete_unknown_id_rejected(tokens: TokenStore, token_id: str) -> None:
    tokens.create()
    with pytest.raises(NotFound, match="engine token ls"):
        tokens.delete(token_id)
    assert len(tokens.list()) == 1
