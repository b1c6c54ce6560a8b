"""`engine sandbox ...` as subprocesses against the shared daemon."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import CliRunner

UNKNOWN_ID = "sb-000000000000"


@pytest.fixture
def sandbox_id(cli: CliRunner) -> Iterator[str]:
    result = cli("sandbox", "create", "--memory", "128", "--name", "cli-test")
    assert result.returncode == 0, result.stderr
    created = result.stdout.strip()
    try:
        yield created
    finally:
        cli("sandbox", "rm", created)


def process_list(cli: CliRunner, sandbox_id: str) -> list[dict]:
    result = cli("sandbox", "ps", sandbox_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_create_prints_id(cli: CliRunner, sandbox_id: str) -> None:
    assert sandbox_id.startswith("sb-")
    assert "\n" not in sandbox_id


def test_create_json(cli: CliRunner) -> None:
    result = cli(
        "sandbox", "create", "--json", "--cpu", "0.5", "--memory", "1Gi",
        "--label", "team=cli", "--ttl", "120", "--env", "A=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    try:
        assert info["state"] == "RUNNING"
        assert info["spec"]["cpu"] == 0.5
        assert info["spec"]["memory_mib"] == 1024
        assert info["spec"]["labels"] == {"team": "cli"}
        assert info["spec"]["ttl"] == 120
        assert info["spec"]["env"] == {"A": "1"}
    finally:
        cli("sandbox", "rm", info["sandbox_id"])


def test_ls_json_lists_sandbox(cli: CliRunner, sandbox_id: str) -> None:
    result = cli("sandbox", "ls", "--json")
    assert result.returncode == 0, result.stderr
    listed = {item["sandbox_id"]: item for item in json.loads(result.stdout)}
    assert listed[sandbox_id]["state"] == "RUNNING"
    assert listed[sandbox_id]["spec"]["name"] == "cli-test"


def test_ls_table(cli: CliRunner, sandbox_id: str) -> None:
    result = cli("sandbox", "ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["SANDBOX", "ID"]
    row = next(line for line in lines if line.startswith(sandbox_id))
    assert "RUNNING" in row
    assert "cli-test" in row
    assert "128Mi" in row


def test_rm_hides_from_ls(cli: CliRunner) -> None:
    created = cli("sandbox", "create").stdout.strip()
    removed = cli("sandbox", "rm", created)
    assert removed.returncode == 0
    assert removed.stdout == f"{created}\n"
    running = json.loads(cli("sandbox", "ls", "--json").stdout)
    every = json.loads(cli("sandbox", "ls", "--json", "--all").stdout)
    assert created not in [item["sandbox_id"] for item in running]
    states = {item["sandbox_id"]: item["state"] for item in every}
    assert states[created] == "TERMINATED"


def test_exec_output_and_status(cli: CliRunner, sandbox_id: str) -> None:
    result = cli(
        "sandbox",
        "exec",
        sandbox_id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 5",
    )
    assert result.returncode == 5
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


def test_exec_env_workdir_timeout(cli: CliRunner, sandbox_id: str) -> None:
    result = cli(
        "sandbox", "exec", sandbox_id, "--env", "X=42", "--workdir", "/tmp", "--",
        "sh", "-c", 'echo "$X $(pwd)"',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "42 /tmp\n"
    timed = cli("sandbox", "exec", sandbox_id, "--timeout", "0.5", "--", "sleep", "30")
    assert timed.returncode == 124
    assert "timed out" in timed.stderr


def test_exec_interactive(cli: CliRunner, sandbox_id: str) -> None:
    result = cli("sandbox", "exec", "-i", sandbox_id, "--", "wc", "-c", input="12345")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "5"


def test_exec_files_persist(cli: CliRunner, sandbox_id: str) -> None:
    write = cli("sandbox", "exec", sandbox_id, "--", "sh", "-c", "echo kept > /tmp/f")
    assert write.returncode == 0
    read = cli("sandbox", "exec", sandbox_id, "--", "cat", "/tmp/f")
    assert read.stdout == "kept\n"


def test_logs_of_exited_process(cli: CliRunner, sandbox_id: str) -> None:
    cli("sandbox", "exec", sandbox_id, "--", "sh", "-c", "echo logged; echo warn >&2")
    pid = process_list(cli, sandbox_id)[-1]["pid"]
    both = cli("sandbox", "logs", sandbox_id, str(pid))
    assert both.returncode == 0
    assert both.stdout == "logged\n"
    assert both.stderr == "warn\n"
    only_err = cli("sandbox", "logs", sandbox_id, str(pid), "--stream", "stderr")
    assert only_err.stdout == ""
    assert only_err.stderr == "warn\n"


def test_kill_and_ps(cli: CliRunner, sandbox_id: str) -> None:
    started = cli("sandbox", "exec", sandbox_id, "--timeout", "0.2", "--", "true")
    assert started.returncode == 0
    # A long sleep is left running by an exec whose CLI exits at once: the
    # sandbox keeps it, because cancelling the stream does not kill it.
    cli("sandbox", "exec", sandbox_id, "--", "sh", "-c", "sleep 300 > /dev/null &")
    running = [
        p for p in process_list(cli, sandbox_id) if p["argv"][:2] == ["sh", "-c"]
    ]
    assert running
    result = cli(
        "sandbox", "kill", sandbox_id, str(running[-1]["pid"]), "--signal", "TERM"
    )
    assert result.returncode == 0, result.stderr
    table = cli("sandbox", "ps", sandbox_id)
    assert table.stdout.splitlines()[0].split()[:3] == ["PID", "STATE", "EXIT"]


def test_kill_running_process(cli: CliRunner, address: str, sandbox_id: str) -> None:
    from engine import Sandbox

    attached = Sandbox.connect(sandbox_id, address=address)
    try:
        process = attached.process.exec("sleep", "300")
        result = cli("sandbox", "kill", sandbox_id, str(process.pid))
        assert result.returncode == 0, result.stderr
        assert process.wait(timeout=10) == 137
        assert process.status().signal == "SIGKILL"
    finally:
        attached.close()


def test_logs_follow(cli: CliRunner, address: str, sandbox_id: str) -> None:
    from engine import Sandbox

    attached = Sandbox.connect(sandbox_id, address=address)
    try:
        process = attached.process.exec("sh", "-c", "echo one; sleep 0.5; echo two")
        began = time.monotonic()
        result = cli("sandbox", "logs", "--follow", sandbox_id, str(process.pid))
        assert result.returncode == 0
        assert result.stdout == "one\ntwo\n"
        assert time.monotonic() - began >= 0.3
    finally:
        attached.close()


def test_stats_and_inspect(cli: CliRunner, sandbox_id: str) -> None:
    stats = cli("sandbox", "stats", sandbox_id, "--json")
    assert stats.returncode == 0, stats.stderr
    assert set(json.loads(stats.stdout)) == {
        "cpu_seconds",
        "memory_bytes",
        "memory_peak_bytes",
        "pids",
        "disk_bytes",
    }
    inspected = cli("sandbox", "inspect", sandbox_id)
    assert json.loads(inspected.stdout)["sandbox_id"] == sandbox_id


@pytest.mark.parametrize(
    "args",
    [
        ("sandbox", "rm", UNKNOWN_ID),
        ("sandbox", "exec", UNKNOWN_ID, "--", "true"),
        ("sandbox", "logs", UNKNOWN_ID, "2"),
        ("sandbox", "kill", UNKNOWN_ID, "2"),
        ("sandbox", "ps", UNKNOWN_ID),
        ("sandbox", "inspect", UNKNOWN_ID),
    ],
    ids=["rm", "exec", "logs", "kill", "ps", "inspect"],
)
def test_unknown_sandbox_error(cli: CliRunner, args: tuple[str, ...]) -> None:
    result = cli(*args)
    assert result.returncode == 1
    assert result.stderr == f"engine: error: sandbox {UNKNOWN_ID} not found\n"


def test_bad_signal_name(cli: CliRunner, sandbox_id: str) -> None:
    result = cli("sandbox", "kill", sandbox_id, "2", "--signal", "NOPE")
    assert result.returncode == 1
    assert result.stderr.startswith("engine: error: invalid signal 'NOPE'")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("run", "--help"), ["cores", "MiB", "SECONDS", "stdin"]),
        (("sandbox", "create", "--help"), ["cores", "MiB", "seconds", "label"]),
        (("sandbox", "exec", "--help"), ["SECONDS", "stdin", "environment"]),
        (("serve", "--help"), ["unix socket", "TCP", "0600"]),
        (("--help",), ["serve", "run", "sandbox"]),
    ],
    ids=["run", "create", "exec", "serve", "main"],
)
def test_help_names_units(
    cli: CliRunner, args: tuple[str, ...], words: list[str]
) -> None:
    result = cli(*args)
    assert result.returncode == 0
    for word in words:
        assert word in result.stdout, word
