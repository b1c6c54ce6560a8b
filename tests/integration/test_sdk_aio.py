"""The asyncio SDK against the shared daemon."""

from __future__ import annotations

import asyncio

import pytest

from engine import errors
from engine.core.models import ExitReason, ProcessState, SandboxState
from engine.sdk.aio import AsyncSandbox


def test_aio_exec_and_read(address: str) -> None:
    async def scenario() -> None:
        async with await AsyncSandbox(address=address, memory="128Mi").create() as sb:
            process = await sb.process.exec(
                "sh", "-c", "echo out; echo err >&2; exit 2"
            )
            assert await process.wait() == 2
            assert await process.stdout.read() == "out\n"
            assert await process.stderr.read() == "err\n"
            assert await process.stdout.read() == ""
            status = await process.status()
            assert status.state == ProcessState.EXITED
            assert status.reason == ExitReason.EXITED

    asyncio.run(scenario())


def test_aio_lines_stdin_kill(address: str) -> None:
    async def scenario() -> None:
        async with await AsyncSandbox(address=address).create() as sb:
            echo = await sb.process.exec("cat", stdin=True)
            await echo.stdin.write("a\nb\n")
            await echo.stdin.close()
            lines = [line async for line in echo.stdout]
            assert lines == ["a\n", "b\n"]

            sleeper = await sb.process.exec("sleep", "30")
            with pytest.raises(errors.DeadlineExceeded):
                await sleeper.wait(timeout=0.2)
            await sleeper.kill()
            assert await sleeper.wait(timeout=10) == 137

            result = await sb.process.run_code("print(6*7)")
            assert result.stdout == "42\n"
            ran = await sb.process.run("sh", "-c", "echo e >&2; exit 5", cwd="/tmp")
            assert ran.exit_code == 5
            assert ran.stderr == "e\n"
            assert ran.stdout == ""
            processes = await sb.process.list_processes()
            assert processes[sleeper.pid].signal == "SIGKILL"

    asyncio.run(scenario())


def test_aio_connect_and_errors(address: str) -> None:
    async def scenario() -> None:
        with pytest.raises(errors.NotFound):
            await AsyncSandbox.connect("sb-000000000000", address=address)
        async with await AsyncSandbox(address=address).create() as sb:
            attached = await AsyncSandbox.connect(sb.sandbox_id, address=address)
            info = await attached.status()
            assert info.state == SandboxState.RUNNING
            await attached.close()
            listed = await AsyncSandbox.list(
                address=address, state=SandboxState.RUNNING
            )
            assert sb.sandbox_id in [i.sandbox_id for i in listed]
        with pytest.raises(errors.InvalidArgument):
            await AsyncSandbox(address=address, cpu=-1).create()

    asyncio.run(scenario())
