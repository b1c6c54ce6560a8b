"""`engine volume ...` and `--volume` as subprocesses against the shared daemon."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import CliRunner


@pytest.fixture
def volume(cli: CliRunner) -> Iterator[str]:
    """A new volume on the shared daemon, removed at teardown."""
    name = f"cli-{uuid.uuid4().hex[:10]}"
    result = cli("volume", "create", name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{name}\n"
    yield name
    cli("volume", "rm", name)


def listed_volumes(cli: CliRunner) -> dict[str, dict]:
    result = cli("volume", "ls", "--json")
    assert result.returncode == 0, result.stderr
    return {volume["name"]: volume for volume in json.loads(result.stdout)}


def listed_paths(cli: CliRunner, volume: str, pattern: str = "") -> list[str]:
    result = cli("volume", "ls", volume, pattern, "--json")
    assert result.returncode == 0, result.stderr
    return [entry["path"] for entry in json.loads(result.stdout)]


def test_create_and_ls(cli: CliRunner, volume: str) -> None:
    again = cli("volume", "create", volume)
    assert again.returncode == 0, again.stderr
    listed = listed_volumes(cli)
    assert listed[volume]["size_bytes"] == 0
    assert listed[volume]["file_count"] == 0
    assert listed[volume]["sandbox_ids"] == []
    table = cli("volume", "ls")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == [
        "NAME",
        "SIZE",
        "FILES",
        "SANDBOXES",
        "CREATED",
        "BACKEND",
    ]
    assert any(line.startswith(volume) for line in table.stdout.splitlines())


def test_create_invalid_name(cli: CliRunner) -> None:
    result = cli("volume", "create", "Not Valid")
    assert result.returncode == 1
    assert "invalid volume name 'Not Valid'" in result.stderr


def test_put_get_stat(cli: CliRunner, volume: str, tmp_path: Path) -> None:
    local = tmp_path / "in.txt"
    local.write_text("hello volume\n")
    put = cli("volume", "put", volume, str(local), "docs/")
    assert put.returncode == 0, put.stderr
    assert put.stdout == "/docs/in.txt\n"

    stat = cli("volume", "stat", volume, "docs/in.txt", "--json")
    assert stat.returncode == 0, stat.stderr
    info = json.loads(stat.stdout)
    assert info["type"] == "file"
    assert info["size"] == 13

    out = tmp_path / "out.txt"
    get = cli("volume", "get", volume, "docs/in.txt", str(out))
    assert get.returncode == 0, get.stderr
    assert out.read_text() == "hello volume\n"
    to_stdout = cli("volume", "get", volume, "docs/in.txt", "-")
    assert to_stdout.stdout == "hello volume\n"


def test_put_stdin(cli: CliRunner, volume: str) -> None:
    put = cli("volume", "put", volume, "-", "from-stdin", input="piped\n")
    assert put.returncode == 0, put.stderr
    assert cli("volume", "get", volume, "from-stdin", "-").stdout == "piped\n"


def test_put_get_directory(cli: CliRunner, volume: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a").write_text("a")
    (tree / "sub" / "b").write_text("b")
    put = cli("volume", "put", volume, str(tree), "copy")
    assert put.returncode == 0, put.stderr
    assert put.stdout.splitlines() == ["/copy/a", "/copy/sub/b"]
    back = tmp_path / "back"
    get = cli("volume", "get", volume, "copy", str(back))
    assert get.returncode == 0, get.stderr
    assert (back / "a").read_text() == "a"
    assert (back / "sub" / "b").read_text() == "b"


def test_cp_mv_rm_path(cli: CliRunner, volume: str) -> None:
    assert cli("volume", "put", volume, "-", "a.txt", input="a").returncode == 0
    copy = cli("volume", "cp", volume, "a.txt", "b.txt")
    assert copy.returncode == 0, copy.stderr
    assert copy.stdout == "/b.txt\n"
    move = cli("volume", "mv", volume, "b.txt", "dir/")
    assert move.returncode == 1
    assert "/dir" in move.stderr
    assert cli("volume", "put", volume, "-", "dir/keep", input="k").returncode == 0
    move = cli("volume", "mv", volume, "b.txt", "dir")
    assert move.returncode == 0, move.stderr
    assert move.stdout == "/dir/b.txt\n"
    assert listed_paths(cli, volume, "**/*.txt") == ["a.txt", "dir/b.txt"]
    removed = cli("volume", "rm-path", volume, "**/*.txt")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == ["/a.txt", "/dir/b.txt"]
    assert listed_paths(cli, volume) == ["dir"]
    root = cli("volume", "rm-path", volume, "/")
    assert root.returncode == 1
    assert "root of volume" in root.stderr
    assert listed_paths(cli, volume) == ["dir"]


def test_run_with_volume(cli: CliRunner, volume: str) -> None:
    write = cli(
        "run", "--volume", f"{volume}:/data", "--", "sh", "-c", "echo w > /data/f"
    )
    assert write.returncode == 0, write.stderr
    read = cli("run", "--volume", f"{volume}:/mnt/x:ro", "--", "cat", "/mnt/x/f")
    assert read.returncode == 0, read.stderr
    assert read.stdout == "w\n"
    denied = cli(
        "run", "--volume", f"{volume}:/data:ro", "--", "sh", "-c", "echo x > /data/f"
    )
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr
    assert cli("volume", "get", volume, "f", "-").stdout == "w\n"


def test_run_volume_created_on_use(cli: CliRunner) -> None:
    name = f"cli-{uuid.uuid4().hex[:10]}"
    try:
        result = cli("run", "--volume", f"{name}:/root/v", "--", "ls", "-A", "/root/v")
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert name in listed_volumes(cli)
    finally:
        cli("volume", "rm", name)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("novolume", "expected NAME:PATH"),
        (":/data", "expected NAME:PATH"),
        ("data:", "expected NAME:PATH"),
        ("data:relative", "must be an absolute path"),
        ("data:/proc", "inside /proc"),
    ],
)
def test_run_volume_invalid(cli: CliRunner, value: str, message: str) -> None:
    result = cli("run", "--volume", value, "--", "true")
    assert result.returncode == 1
    assert message in result.stderr


def test_sandbox_create_volume_and_rm_mounted(cli: CliRunner, volume: str) -> None:
    created = cli(
        "sandbox", "create", "--volume", f"{volume}:/a", "--volume", f"{volume}:/b:ro"
    )
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    try:
        inspect = cli("sandbox", "inspect", sandbox_id)
        volumes = json.loads(inspect.stdout)["spec"]["volumes"]
        assert volumes == [
            {"name": volume, "mount_path": "/a", "read_only": False},
            {"name": volume, "mount_path": "/b", "read_only": True},
        ]
        assert listed_volumes(cli)[volume]["sandbox_ids"] == [sandbox_id]
        removed = cli("volume", "rm", volume)
        assert removed.returncode == 1
        assert sandbox_id in removed.stderr
    finally:
        cli("sandbox", "rm", sandbox_id)
    removed = cli("volume", "rm", volume)
    assert removed.returncode == 0, removed.stderr
    assert volume not in listed_volumes(cli)


def test_rm_unknown(cli: CliRunner) -> None:
    result = cli("volume", "rm", "no-such-volume")
    assert result.returncode == 1
    assert "volume 'no-such-volume' not found" in result.stderr
