"""`engine run` as a subprocess, against the shared daemon and without one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from engine import Sandbox
from engine.core.models import SandboxState

if TYPE_CHECKING:
    from conftest import CliRunner

ENGINE_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "engine"


def running_ids(address: str) -> set[str]:
    return {
        info.sandbox_id
        for info in Sandbox.list(address=address, state=SandboxState.RUNNING)
    }


def all_ids(address: str) -> set[str]:
    return {info.sandbox_id for info in Sandbox.list(address=address)}


def test_run_prints_output(cli: CliRunner) -> None:
    result = cli("run", "--", "python3", "-c", "print(6*7)")
    assert result.returncode == 0
    assert result.stdout == "42\n"
    assert result.stderr == ""


def test_run_exit_code(cli: CliRunner) -> None:
    result = cli("run", "--", "sh", "-c", "exit 3")
    assert result.returncode == 3


def test_run_streams_separate(cli: CliRunner) -> None:
    result = cli("run", "--", "sh", "-c", "echo out; echo err >&2")
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


def test_run_binary_stdout(cli: CliRunner) -> None:
    result = cli("run", "--", "printf", "\\000\\377\\n", text=False)
    assert result.returncode == 0
    assert result.stdout == b"\x00\xff\n"


def test_run_timeout_exit_124(cli: CliRunner) -> None:
    began = time.monotonic()
    result = cli("run", "--timeout", "1", "--", "sleep", "10")
    elapsed = time.monotonic() - began
    assert result.returncode == 124
    assert "engine: killed: timed out after 1 s" in result.stderr
    assert elapsed < 6


def test_run_oom_exit_137(cli: CliRunner) -> None:
    result = cli("run", "--memory", "32", "--", "python3", "-c", "x=bytearray(200<<20)")
    assert result.returncode == 137
    assert "engine: killed: out of memory (limit 32 MiB)" in result.stderr.splitlines()


def test_run_memory_size_string(cli: CliRunner) -> None:
    script = "print(open('/proc/self/cgroup').read() != '')"
    result = cli("run", "--memory", "64Mi", "--", "python3", "-c", script)
    assert result.returncode == 0
    assert result.stdout == "True\n"


def test_run_env_and_workdir(cli: CliRunner) -> None:
    result = cli(
        "run", "--env", "A=1", "--env", "B=two", "--workdir", "/tmp", "--",
        "sh", "-c", 'echo "$A $B $(pwd)"',
    )  # fmt: skip
    assert result.returncode == 0
    assert result.stdout == "1 two /tmp\n"


def test_run_interactive_stdin(cli: CliRunner) -> None:
    result = cli("run", "-i", "--", "cat", input="from the terminal\n")
    assert result.returncode == 0
    assert result.stdout == "from the terminal\n"


def test_run_stdin_default_devnull(cli: CliRunner) -> None:
    result = cli("run", "--", "cat", input="ignored\n")
    assert result.returncode == 0
    assert result.stdout == ""


def test_run_terminates_sandbox(cli: CliRunner, address: str) -> None:
    before = all_ids(address)
    result = cli("run", "--", "true")
    assert result.returncode == 0
    created = all_ids(address) - before
    assert len(created) == 1
    assert created.isdisjoint(running_ids(address))


def test_run_ctrl_c_terminates(cli_env: dict[str, str], address: str) -> None:
    before = running_ids(address)
    process = subprocess.Popen(
        [str(ENGINE_BIN), "run", "--", "sleep", "100"],
        env=cli_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not running_ids(address) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        started = running_ids(address) - before
        assert len(started) == 1
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert started.isdisjoint(running_ids(address))


def test_run_sigterm_terminates(cli_env: dict[str, str], address: str) -> None:
    before = running_ids(address)
    process = subprocess.Popen(
        [str(ENGINE_BIN), "run", "--", "sleep", "100"],
        env=cli_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not running_ids(address) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        started = running_ids(address) - before
        assert len(started) == 1
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stderr
    assert started.isdisjoint(running_ids(address))


def test_run_embedded_sigterm_cleans_up(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_ADDRESS"}
    process = subprocess.Popen(
        [str(ENGINE_BIN), "--data-dir", str(data_dir), "run", "--", "sleep", "100"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The embedded engine mounts its layer file system in its zygote's
        # mount namespace only, so the sandbox's layer is found through it.
        sandboxes = data_dir / "sandboxes"
        layers = Path("/nonexistent")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for child in psutil.Process(process.pid).children():
                with contextlib.suppress(psutil.Error):
                    if "engine.runtime.zygote" in " ".join(child.cmdline()):
                        layers = Path(f"/proc/{child.pid}/root{sandboxes}")
            with contextlib.suppress(OSError):
                if any(layers.iterdir()):
                    break
            time.sleep(0.05)
        assert any(layers.iterdir())
        below = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stderr
    assert list(sandboxes.iterdir()) == []
    deadline = time.monotonic() + 5
    while any(p.is_running() for p in below) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p.pid for p in below if p.is_running()] == []


def test_run_without_daemon_embedded(cli: CliRunner, data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_ADDRESS"}
    result = cli(
        "--data-dir", str(data_dir), "run", "--", "python3", "-c", "print(6*7)", env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "42\n"
    assert list((data_dir / "sandboxes").iterdir()) == []
    assert not (data_dir / "engine.sock").exists()


def test_run_missing_command(cli: CliRunner) -> None:
    result = cli("run")
    assert result.returncode == 1
    assert result.stderr.startswith("engine: error: missing command")
    assert "Traceback" not in result.stderr


def test_run_invalid_cpu(cli: CliRunner) -> None:
    result = cli("run", "--cpu", "-1", "--", "true")
    assert result.returncode == 1
    assert result.stderr.startswith("engine: error: ")
    assert "-1" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_run_missing_program(cli: CliRunner) -> None:
    result = cli("run", "--", "no-such-program-xyz")
    assert result.returncode == 127
    assert result.stderr.startswith("engine: error: ")
    assert "no-such-program-xyz" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_unreachable_address(cli: CliRunner, tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/none.sock"
    result = cli("--address", address, "run", "--", "true")
    assert result.returncode == 1
    assert result.stderr.startswith("engine: error: cannot connect")
    assert "engine serve" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_without_separator(cli: CliRunner) -> None:
    result = cli("run", "python3", "-c", "print('no separator')")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "no separator\n"


def test_run_global_option_after_command(cli: CliRunner, address: str) -> None:
    result = cli("run", "--address", address, "--", "echo", "--address")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "--address\n"
