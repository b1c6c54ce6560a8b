"""`engine fs ...` as subprocesses against the shared daemon."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from engine import SandboxInstance

if TYPE_CHECKING:
    from conftest import CliRunner


def ok(cli: CliRunner, *args: str, **options: object) -> str:
    result = cli("fs", *args, **options)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_put_get_files(
    cli: CliRunner, sandbox: SandboxInstance, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    data = os.urandom(3 * 1024 * 1024 + 7)
    source.write_bytes(data)
    target = tmp_path / "target"

    ok(cli, "put", sandbox.sandbox_id, str(source), "/tmp/data", "--mode", "0640")
    ok(cli, "get", sandbox.sandbox_id, "/tmp/data", str(target))

    assert target.read_bytes() == data
    info = sandbox.fs.stat_file("/tmp/data")
    assert info.mode == 0o640
    assert info.size == len(data)


def test_put_get_stdio(cli: CliRunner, sandbox: SandboxInstance) -> None:
    data = os.urandom(2 * 1024 * 1024)
    result = cli(
        "fs", "put", sandbox.sandbox_id, "-", "/tmp/piped", input=data, text=False
    )
    assert result.returncode == 0, result.stderr
    result = cli("fs", "get", sandbox.sandbox_id, "/tmp/piped", "-", text=False)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()
    assert sandbox.fs.stat_file("/tmp/piped").mode == 0o644


def test_ls_json_and_table(cli: CliRunner, sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/dir/file", b"12345", parents=True, mode=0o600)
    process = sandbox.process.exec("python3", "-c", "open(b'/tmp/\\xff', 'w')")
    assert process.wait() == 0

    entries = json.loads(ok(cli, "ls", sandbox.sandbox_id, "/tmp", "--json"))
    table = ok(cli, "ls", sandbox.sandbox_id, "/tmp/dir")
    recursive = ok(cli, "ls", sandbox.sandbox_id, "/tmp", "-r")

    assert [entry["name"] for entry in entries] == ["dir", "\udcff"]
    assert entries[0]["type"] == "dir"
    assert table.splitlines()[0].split() == [
        "MODE",
        "UID",
        "GID",
        "SIZE",
        "MODIFIED",
        "NAME",
    ]
    row = table.splitlines()[1].split()
    assert row[0] == "-rw-------"
    assert row[3] == "5"
    assert row[-1] == "file"
    assert "/tmp/dir/file" in recursive
    assert "/tmp/\\xff" in recursive


def test_stat_json(cli: CliRunner, sandbox: SandboxInstance) -> None:
    sandbox.fs.write_bytes("/tmp/file", b"abc", mode=0o751)
    info = json.loads(ok(cli, "stat", sandbox.sandbox_id, "/tmp/file", "--json"))
    text = ok(cli, "stat", sandbox.sandbox_id, "/tmp/file")
    assert info["mode"] == 0o751
    assert info["size"] == 3
    assert info["type"] == "file"
    assert "mode    0751 (-rwxr-x--x)" in text


def test_mkdir_chmod_mv_rm(cli: CliRunner, sandbox: SandboxInstance) -> None:
    sandbox_id = sandbox.sandbox_id
    ok(cli, "mkdir", sandbox_id, "/tmp/a/b", "-p", "--mode", "700")
    ok(cli, "put", sandbox_id, "-", "/tmp/a/b/file", input="x")
    ok(cli, "chmod", sandbox_id, "0o640", "/tmp/a/b/file")
    ok(cli, "mv", sandbox_id, "/tmp/a/b/file", "/tmp/moved")

    assert sandbox.fs.stat_file("/tmp/a/b").mode == 0o700
    assert sandbox.fs.stat_file("/tmp/moved").mode == 0o640

    rejected = cli("fs", "rm", sandbox_id, "/tmp/a")
    assert rejected.returncode == 1
    assert "is a directory; pass -r" in rejected.stderr
    ok(cli, "rm", sandbox_id, "/tmp/moved")
    ok(cli, "rm", sandbox_id, "-r", "/tmp/a")
    assert sandbox.fs.list_files("/tmp") == []


def test_find_and_replace(cli: CliRunner, sandbox: SandboxInstance) -> None:
    sandbox.fs.write_text("/tmp/src/a.txt", "one\ntwo one\n", parents=True)
    sandbox.fs.write_text("/tmp/src/b.txt", "none\n")

    found = ok(cli, "find", sandbox.sandbox_id, "/tmp/src", r"\bone\b")
    limited = cli("fs", "find", sandbox.sandbox_id, "/tmp/src", "one", "--max", "1")
    replaced = ok(cli, "replace", sandbox.sandbox_id, "/tmp/src", r"\bone\b", "1")

    assert found.splitlines() == [
        "/tmp/src/a.txt:1:1:one",
        "/tmp/src/a.txt:2:5:two one",
    ]
    assert limited.returncode == 0
    assert len(limited.stdout.splitlines()) == 1
    assert "stopped after 1 matches" in limited.stderr
    assert replaced.splitlines() == ["/tmp/src/a.txt"]
    assert sandbox.fs.read_text("/tmp/src/a.txt") == "1\ntwo 1\n"
    assert sandbox.fs.read_text("/tmp/src/b.txt") == "none\n"


def test_bad_mode_usage_error(cli: CliRunner, sandbox: SandboxInstance) -> None:
    for mode in ("9", "rwx", "17777", "-1"):
        result = cli("fs", "chmod", sandbox.sandbox_id, mode, "/tmp")
        assert result.returncode == 2, mode
        assert f"invalid mode {mode!r}" in result.stderr, mode
    assert sandbox.fs.stat_file("/tmp").mode == 0o1777


def test_errors_name_the_value(cli: CliRunner, sandbox: SandboxInstance) -> None:
    missing = cli("fs", "stat", sandbox.sandbox_id, "/tmp/missing")
    unknown = cli("fs", "ls", "sb-000000000000", "/tmp")
    bad_regex = cli("fs", "find", sandbox.sandbox_id, "/tmp", "(")
    read_only = cli("fs", "put", sandbox.sandbox_id, "-", "/usr/x", input="x")

    assert missing.returncode == 1
    assert missing.stderr.startswith("engine: error: '/tmp/missing': No such file")
    assert unknown.returncode == 1
    assert "sb-000000000000 not found" in unknown.stderr
    assert bad_regex.returncode == 1
    assert "invalid pattern '('" in bad_regex.stderr
    assert read_only.returncode == 1
    assert "'/usr/x': Read-only file system" in read_only.stderr
    for result in (missing, unknown, bad_regex, read_only):
        assert "Traceback" not in result.stderr
