"""Sandbox lifecycle through the synchronous SDK against the shared daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Sandbox, errors
from engine.core.models import SandboxState, TerminationReason
from engine.sdk.client import resolve_address


def test_create_with_limits(address: str) -> None:
    with Sandbox(
        cpu=0.5,
        memory="64Mi",
        pids=64,
        env={"MODE": "test"},
        workdir="/tmp",
        name="sdk-limits",
        labels={"suite": "sdk"},
        ttl=120,
        address=address,
    ).create() as sb:
        info = sb.status()
        assert sb.sandbox_id.startswith("sb-")
        assert info.state == SandboxState.RUNNING
        assert info.spec.cpu == 0.5
        assert info.spec.memory_mib == 64
        assert info.spec.pids == 64
        assert info.spec.ttl == 120
        assert info.spec.name == "sdk-limits"
        assert info.spec.labels == {"suite": "sdk"}
        process = sb.process.exec("sh", "-c", 'echo "$MODE"; pwd')
        assert process.wait() == 0
        assert process.stdout.read() == "test\n/tmp\n"


def test_context_manager_terminates(address: str) -> None:
    with Sandbox(address=address).create() as sb:
        sandbox_id = sb.sandbox_id
    attached = Sandbox.connect(sandbox_id, address=address)
    info = attached.status()
    attached.close()
    assert info.state == SandboxState.TERMINATED
    assert info.reason == TerminationReason.USER


def test_connect_attaches(address: str) -> None:
    with Sandbox(address=address, ttl=300).create() as sb:
        before = sb.status()
        attached = Sandbox.connect(sb.sandbox_id, address=address)
        try:
            after = attached.status()
            process = attached.process.exec("echo", "attached")
            assert process.wait() == 0
            assert process.stdout.read() == "attached\n"
        finally:
            attached.close()
        assert after.spec.ttl == before.spec.ttl
        assert after.last_activity_at == before.last_activity_at
        assert sb.status().state == SandboxState.RUNNING


def test_connect_unknown_not_found(address: str) -> None:
    with pytest.raises(errors.NotFound):
        Sandbox.connect("sb-000000000000", address=address)


def test_update_ttl_and_stats(sandbox) -> None:
    info = sandbox.update_ttl(60)
    assert info.spec.ttl == 60
    stats = sandbox.stats()
    assert stats.memory_bytes >= 0
    assert stats.pids >= 0


def test_terminate_twice(address: str) -> None:
    sb = Sandbox(address=address).create()
    first = sb.terminate()
    second = sb.terminate()
    assert first.state == SandboxState.TERMINATED
    assert second.terminated_at == first.terminated_at
    with pytest.raises(errors.FailedPrecondition):
        sb.process.exec("true")
    sb.close()


def test_closed_instance_raises(address: str) -> None:
    with Sandbox(address=address).create() as sb:
        attached = Sandbox.connect(sb.sandbox_id, address=address)
        attached.close()
        with pytest.raises(errors.FailedPrecondition) as caught:
            attached.status()
        assert "closed" in str(caught.value)


def test_list_by_label(address: str) -> None:
    with Sandbox(address=address, labels={"sdk-list": "yes"}).create() as sb:
        found = Sandbox.list(address=address, labels={"sdk-list": "yes"})
        running = Sandbox.list(address=address, state=SandboxState.RUNNING)
        assert [info.sandbox_id for info in found] == [sb.sandbox_id]
        assert sb.sandbox_id in [info.sandbox_id for info in running]


@pytest.mark.parametrize(
    "settings",
    [{"cpu": -1}, {"memory": -5}, {"pids": 0}, {"workdir": "relative"}],
    ids=["cpu", "memory", "pids", "workdir"],
)
def test_create_invalid_settings(address: str, settings: dict) -> None:
    with pytest.raises(errors.InvalidArgument):
        Sandbox(address=address, **settings).create()


@pytest.mark.parametrize("text", ["12abc", "1.5Mi", "Mi", "-3Mi"])
def test_memory_string_invalid(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        Sandbox(memory=text)


@pytest.mark.parametrize(
    ("text", "mib"), [("512Mi", 512), ("1Gi", 1024), ("2048Ki", 2), ("256", 256)]
)
def test_memory_string_parsed(text: str, mib: int) -> None:
    assert Sandbox(memory=text).memory_mib == mib


def test_no_daemon_unavailable(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/missing.sock"
    with pytest.raises(errors.Unavailable) as caught:
        Sandbox(address=address).create()
    message = str(caught.value)
    assert address in message
    assert "engine serve" in message


def test_address_from_environment(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGINE_ADDRESS", address)
    assert resolve_address() == address
    with Sandbox().create() as sb:
        assert sb.address == address
        assert sb.process.run_code("print('env')").stdout == "env\n"


def test_resolve_address_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_ADDRESS", raising=False)
    assert resolve_address("/run/e.sock") == "unix:/run/e.sock"
    assert resolve_address("127.0.0.1:7000") == "127.0.0.1:7000"
    assert resolve_address(None, "/srv/engine") == "unix:/srv/engine/engine.sock"
