"""Processes through the synchronous SDK against the shared daemon."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from engine import SandboxInstance, errors
from engine.core.models import ExitReason, ProcessState


def test_exec_stdout_and_exit_code(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("python3", "-c", "print(6*7)")
    assert process.pid > 0
    assert process.wait() == 0
    assert process.stdout.read() == "42\n"
    assert process.stderr.read() == ""


def test_exec_nonzero_exit(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("sh", "-c", "echo oops >&2; exit 7")
    assert process.wait() == 7
    assert process.stderr.read() == "oops\n"
    status = process.status()
    assert status.state == ProcessState.EXITED
    assert status.exit_code == 7
    assert status.reason == ExitReason.EXITED
    assert status.signal == ""


def test_exec_accepts_argv_list(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec(["echo", "a b", "c"])
    assert process.wait() == 0
    assert process.stdout.read() == "a b c\n"


def test_exec_env_and_cwd(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec(
        "sh", "-c", 'echo "$GREETING"; pwd', env={"GREETING": "hi"}, cwd="/tmp"
    )
    assert process.wait() == 0
    assert process.stdout.read() == "hi\n/tmp\n"


def test_binary_output_byte_exact(sandbox: SandboxInstance) -> None:
    writer = sandbox.process.exec(
        "sh", "-c", "head -c 1000000 /dev/urandom | tee /tmp/random.bin"
    )
    assert writer.wait() == 0
    data = writer.stdout.read_bytes()
    assert len(data) == 1_000_000
    checker = sandbox.process.exec("sha256sum", "/tmp/random.bin")
    assert checker.wait() == 0
    digest = checker.stdout.read().split()[0]
    assert digest == hashlib.sha256(data).hexdigest()


def test_stdout_stderr_separate(sandbox: SandboxInstance) -> None:
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done"
    process = sandbox.process.exec("sh", "-c", script)
    assert process.wait() == 0
    assert process.stdout.read() == "out1\nout2\nout3\n"
    assert process.stderr.read() == "err1\nerr2\nerr3\n"


def test_second_read_after_eof_empty(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("echo", "once")
    assert process.stdout.read() == "once\n"
    assert process.stdout.read() == ""
    assert process.stdout.read_bytes() == b""


def test_late_readers_get_same_bytes(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("sh", "-c", "head -c 300000 /dev/urandom")
    assert process.wait() == 0
    time.sleep(0.2)
    first = process.stdout.read_bytes()
    late = sandbox.process.get_process(process.pid).stdout.read_bytes()
    assert len(first) == 300_000
    assert late == first


def test_concurrent_readers_identical(sandbox: SandboxInstance) -> None:
    script = "for i in $(seq 1 50); do echo line$i; sleep 0.01; done"
    process = sandbox.process.exec("sh", "-c", script)
    results: dict[str, bytes] = {}

    def read(name: str) -> None:
        results[name] = sandbox.process.get_process(process.pid).stdout.read_bytes()

    threads = [threading.Thread(target=read, args=(f"r{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    expected = "".join(f"line{i}\n" for i in range(1, 51)).encode()
    assert results["r0"] == expected
    assert results["r1"] == expected


def test_iterate_lines_as_they_arrive(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("sh", "-c", "echo a; sleep 0.5; echo b; printf c")
    arrivals = []
    began = time.monotonic()
    for line in process.stdout:
        arrivals.append((line, time.monotonic() - began))
    assert [line for line, _ in arrivals] == ["a\n", "b\n", "c"]
    # "a" arrives before the sleep ends, so the lines were not read at EOF.
    assert arrivals[0][1] < arrivals[1][1] - 0.3


def test_stdin_echo(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("cat", stdin=True)
    process.stdin.write("hello ")
    process.stdin.write(b"world\n")
    process.stdin.close()
    assert process.wait() == 0
    assert process.stdout.read() == "hello world\n"


def test_stdin_large_write(sandbox: SandboxInstance) -> None:
    payload = bytes(range(256)) * 12_000
    process = sandbox.process.exec("sha256sum", stdin=True)
    process.stdin.write(payload)
    process.stdin.close()
    assert process.wait() == 0
    assert process.stdout.read().split()[0] == hashlib.sha256(payload).hexdigest()


def test_stdin_defaults_to_devnull(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("cat")
    assert process.wait(timeout=10) == 0
    assert process.stdout.read() == ""


def test_stdin_write_after_exit(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("true", stdin=True)
    assert process.wait() == 0
    with pytest.raises(errors.FailedPrecondition):
        process.stdin.write("late")


def test_wait_timeout_raises(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("sleep", "30")
    began = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        process.wait(timeout=0.3)
    assert time.monotonic() - began >= 0.25
    assert process.status().state == ProcessState.RUNNING
    assert process.exit_code is None
    process.kill()


def test_kill_reports_sigkill(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("sleep", "30")
    process.kill()
    assert process.wait(timeout=10) == 137
    status = process.status()
    assert status.signal == "SIGKILL"
    assert status.exit_code == 137


def test_exec_timeout_reason(sandbox: SandboxInstance) -> None:
    process = sandbox.process.exec("sleep", "30", timeout=0.5)
    assert process.wait(timeout=10) == 137
    status = process.status()
    assert status.reason == ExitReason.TIMEOUT
    assert status.signal == "SIGKILL"


def test_run_code(sandbox: SandboxInstance) -> None:
    result = sandbox.process.run_code("import sys; print(1); print(2, file=sys.stderr)")
    assert result.exit_code == 0
    assert result.stdout == "1\n"
    assert result.stderr == "2\n"
    failed = sandbox.process.run_code("raise SystemExit(4)")
    assert failed.exit_code == 4


def test_run_output_and_exit(sandbox: SandboxInstance) -> None:
    result = sandbox.process.run(
        "sh", "-c", 'echo "$A" "$PWD"; echo err >&2; exit 3', cwd="/tmp", env={"A": "b"}
    )
    assert result.exit_code == 3
    assert result.stdout == "b /tmp\n"
    assert result.stderr == "err\n"
    assert result.pid > 0


def test_run_output_past_first_mib(sandbox: SandboxInstance) -> None:
    # 3 MiB on stdout: the Run response contains the first MiB, ReadOutput the rest.
    pattern = "0123456789abcdef"
    count = 3 * 1024 * 1024 // len(pattern)
    script = f"import sys; sys.stdout.write({pattern!r} * {count})"
    result = sandbox.process.run("python3", "-c", script)
    expected = (pattern * count).encode()
    assert result.exit_code == 0
    assert len(result.stdout) == len(expected)
    assert (
        hashlib.sha256(result.stdout.encode()).digest()
        == hashlib.sha256(expected).digest()
    )


def test_run_reports_dropped_output(sandbox: SandboxInstance) -> None:
    # More than the daemon's 8 MiB buffer per stream, so the oldest bytes go.
    size = 12_000_000
    result = sandbox.process.run("head", "-c", str(size), "/dev/zero")
    assert result.exit_code == 0
    assert result.stdout_dropped > 0
    assert len(result.stdout) + result.stdout_dropped == size
    assert result.stderr_dropped == 0


def test_run_ends_with_background_writer(sandbox: SandboxInstance) -> None:
    # The background sleep keeps stdout open after the shell exits.
    started = time.monotonic()
    result = sandbox.process.run("sh", "-c", "sleep 20 & echo x")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0
    assert result.stdout == "x\n"
    assert elapsed < 10


def test_run_timeout_kills(sandbox: SandboxInstance) -> None:
    started = time.monotonic()
    result = sandbox.process.run("sleep", "30", timeout=0.5)
    assert result.exit_code == 137
    assert time.monotonic() - started < 20
    status = sandbox.process.get_process(result.pid).status()
    assert status.reason == ExitReason.TIMEOUT


def test_run_missing_command(sandbox: SandboxInstance) -> None:
    with pytest.raises(errors.NotFound, match="'no-such-command-here' not found"):
        sandbox.process.run("no-such-command-here")


def test_list_processes_includes_exited(sandbox: SandboxInstance) -> None:
    done = sandbox.process.exec("true")
    done.wait()
    running = sandbox.process.exec("sleep", "30")
    processes = sandbox.process.list_processes()
    assert processes[done.pid].state == ProcessState.EXITED
    assert processes[done.pid].exit_code == 0
    assert processes[running.pid].state == ProcessState.RUNNING
    running.kill()


def test_unknown_pid_not_found(sandbox: SandboxInstance) -> None:
    with pytest.raises(errors.NotFound):
        sandbox.process.get_process(4000)


def test_exec_empty_argv_invalid(sandbox: SandboxInstance) -> None:
    with pytest.raises(errors.InvalidArgument):
        sandbox.process.exec()


def test_exec_missing_program(sandbox: SandboxInstance) -> None:
    with pytest.raises((errors.NotFound, errors.InvalidArgument)):
        sandbox.process.exec("no-such-program-xyz")
