"""Embedded use: engine.Engine in the test's own event loop, and EmbeddedEngine."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

import engine
from engine import Config, Sandbox, errors
from engine.core.models import SandboxSpec, SandboxState, Stream
from engine.sdk.embedded import EmbeddedEngine


def test_embedded_engine_serves_sdk(embedded: EmbeddedEngine) -> None:
    socket_path = Path(embedded.address.removeprefix("unix:"))
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(socket_path.parent).st_mode) == 0o700
    with Sandbox(address=embedded.address, memory=128).create() as sb:
        result = sb.process.run_code("print(6*7)")
        assert result.exit_code == 0
        assert result.stdout == "42\n"


def test_embedded_engine_run_coroutine(embedded: EmbeddedEngine) -> None:
    with Sandbox(address=embedded.address).create() as sb:
        infos = embedded.run(embedded.engine.list_sandboxes(state=SandboxState.RUNNING))
        assert [info.sandbox_id for info in infos] == [sb.sandbox_id]


def test_embedded_stop_cleans_up(data_dir: Path) -> None:
    embedded = EmbeddedEngine(data_dir=data_dir).start()
    try:
        socket_dir = Path(embedded.address.removeprefix("unix:")).parent
        sb = Sandbox(address=embedded.address).create()
        # The layer file system is mounted in the zygote's namespace only.
        sandbox_dir = embedded.engine.layers.path / sb.sandbox_id
        assert sandbox_dir.exists()
        sb.close()
        embedded.stop()
        assert not socket_dir.exists()
        assert not sandbox_dir.exists()
        assert list((data_dir / "sandboxes").iterdir()) == []
        with pytest.raises(errors.FailedPrecondition):
            _ = embedded.address
    finally:
        embedded.stop()


def test_engine_in_own_event_loop(data_dir: Path) -> None:
    async def scenario() -> tuple[bytes, int | None, SandboxState]:
        core = engine.Engine(Config.from_data_dir(data_dir))
        await core.start()
        try:
            info = await core.create_sandbox(SandboxSpec(memory_mib=128))
            process = await core.exec(info.sandbox_id, ["sh", "-c", "echo embedded"])
            output = b""
            async for chunk in core.read_output(
                info.sandbox_id, process.pid, Stream.STDOUT
            ):
                output += chunk.data
            final = await core.wait(info.sandbox_id, process.pid)
            terminated = await core.terminate_sandbox(info.sandbox_id)
            return output, final.exit_code, terminated.state
        finally:
            await core.close()

    output, exit_code, state = asyncio.run(scenario())
    assert output == b"embedded\n"
    assert exit_code == 0
    assert state == SandboxState.TERMINATED
