"""``sb.fs`` of the asyncio SDK against the shared daemon."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from pathlib import Path

import pytest

from engine import errors
from engine.sdk.aio import AsyncSandbox

MIB = 1024 * 1024


def test_aio_transfer_roundtrip(address: str, tmp_path: Path) -> None:
    source = tmp_path / "source"
    data = os.urandom(16 * MIB + 1)
    source.write_bytes(data)
    target = tmp_path / "target"

    async def scenario() -> None:
        async with await AsyncSandbox(address=address).create() as sb:
            await sb.fs.upload_file(source, "/tmp/data", mode=0o600)
            info = await sb.fs.stat_file("/tmp/data")
            assert info.size == len(data)
            assert info.mode == 0o600
            await sb.fs.download_file("/tmp/data", target)
            assert await sb.fs.read_bytes("/tmp/data") == data
            buffer = io.BytesIO()
            assert await sb.fs.download_fileobj("/tmp/data", buffer) == len(data)
            assert buffer.getvalue() == data

    asyncio.run(scenario())
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert sorted(os.listdir(tmp_path)) == ["source", "target"]


def test_aio_metadata_and_search(address: str) -> None:
    async def scenario() -> None:
        async with await AsyncSandbox(address=address).create() as sb:
            await sb.fs.write_text("/tmp/src/a.txt", "alpha\nbeta\n", parents=True)
            await sb.fs.write_bytes("/tmp/src/b.txt", b"gamma\n")
            directory = await sb.fs.create_directory("/tmp/src/d", mode=0o700)
            assert directory.mode == 0o700

            entries = await sb.fs.list_files("/tmp/src", recursive=True)
            assert [entry.name for entry in entries] == ["a.txt", "b.txt", "d"]
            assert entries.truncated is False

            matches = await sb.fs.find_in_files("/tmp/src", "a$")
            assert [(m.path, m.line) for m in matches] == [
                ("/tmp/src/a.txt", 1),
                ("/tmp/src/a.txt", 2),
                ("/tmp/src/b.txt", 1),
            ]
            limited = await sb.fs.find_in_files("/tmp/src", "a", max_matches=1)
            assert limited.truncated is True

            changed = await sb.fs.replace_in_files("/tmp/src", "beta", "BETA")
            assert changed == ["/tmp/src/a.txt"]
            assert await sb.fs.read_text("/tmp/src/a.txt") == "alpha\nBETA\n"

            moved = await sb.fs.move("/tmp/src/b.txt", "/tmp/src/c.txt")
            assert moved.name == "c.txt"
            assert (await sb.fs.chmod("/tmp/src/c.txt", 0o640)).mode == 0o640
            await sb.fs.delete_file("/tmp/src/c.txt")
            await sb.fs.delete_directory("/tmp/src", recursive=True)
            assert await sb.fs.list_files("/tmp") == []

    asyncio.run(scenario())


def test_aio_errors(address: str) -> None:
    async def scenario() -> None:
        async with await AsyncSandbox(address=address).create() as sb:
            with pytest.raises(errors.NotFound, match="/tmp/missing"):
                await sb.fs.read_bytes("/tmp/missing")
            with pytest.raises(errors.PermissionDenied, match="/usr/x"):
                await sb.fs.write_bytes("/usr/x", b"x")
            with pytest.raises(errors.InvalidArgument, match="invalid mode"):
                await sb.fs.chmod("/tmp", 0o10000)
            with pytest.raises(errors.InvalidArgument, match="invalid pattern"):
                await sb.fs.find_in_files("/tmp", "(")

    asyncio.run(scenario())
