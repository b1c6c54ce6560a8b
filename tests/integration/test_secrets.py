"""Secrets against the real daemon: the service, sandboxes, execs and the CLI."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest

from engine import Sandbox
from engine.errors import AlreadyExists, InvalidArgument, NotFound
from engine.sdk.embedded import EmbeddedEngine
from engine.sdk.secrets import SecretClient
from engine.v1 import sandbox_pb2, sandbox_pb2_grpc, secret_pb2

if TYPE_CHECKING:
    from conftest import CliRunner, Daemon

from conftest import ENGINE_BIN


def unique_name(prefix: str = "TEST_SECRET") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10].upper()}"


def unique_value() -> str:
    return f"value-{uuid.uuid4().hex}"


@pytest.fixture
def secrets(address: str) -> Iterator[SecretClient]:
    client = SecretClient(address)
    created_before = {info.name for info in client.list()}
    try:
        yield client
    finally:
        for info in client.list():
            if info.name not in created_before:
                client.delete(info.name)
        client.close()


@pytest.fixture
def secret(secrets: SecretClient) -> tuple[str, str]:
    name, value = unique_name(), unique_value()
    secrets.create(name, value)
    return name, value


def printenv(sandbox, name: str, **options) -> tuple[int, str]:
    process = sandbox.process.exec("printenv", name, **options)
    code = process.wait()
    return code, process.stdout.read()


# ----------------------------------------------------------------- service


def test_secret_roundtrip(secrets: SecretClient) -> None:
    name = unique_name()
    before = time.time()
    info = secrets.create(name, unique_value())
    assert info.name == name
    assert before - 1 <= info.created_at <= time.time() + 1
    assert info.updated_at == info.created_at
    assert name in [entry.name for entry in secrets.list()]
    secrets.delete(name)
    assert name not in [entry.name for entry in secrets.list()]


def test_secret_message_has_no_value_field() -> None:
    fields = set(secret_pb2.Secret.DESCRIPTOR.fields_by_name)
    assert fields == {"name", "created_at", "updated_at"}


def test_secret_list_never_returns_value(address: str, secret: tuple[str, str]) -> None:
    name, value = secret
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary(
            "/engine.v1.SecretService/List",
            request_serializer=secret_pb2.SecretListRequest.SerializeToString,
            response_deserializer=lambda data: data,
        )
        raw = stub(secret_pb2.SecretListRequest())
    assert name.encode() in raw
    assert value.encode() not in raw


def test_secret_create_taken_name(
    secrets: SecretClient, secret: tuple[str, str]
) -> None:
    name, _ = secret
    with pytest.raises(AlreadyExists, match=name):
        secrets.create(name, "other")


def test_secret_overwrite_replaces_value(
    address: str, secrets: SecretClient, secret: tuple[str, str]
) -> None:
    name, _ = secret
    first = next(info for info in secrets.list() if info.name == name)
    time.sleep(0.01)
    replaced = secrets.create(name, "second value", overwrite=True)
    assert replaced.created_at == pytest.approx(first.created_at)
    assert replaced.updated_at > first.updated_at
    with Sandbox(address=address, secrets=[name]).create() as sb:
        assert printenv(sb, name) == (0, "second value\n")


def test_secret_delete_unknown(secrets: SecretClient) -> None:
    name = unique_name()
    with pytest.raises(NotFound, match=name):
        secrets.delete(name)


@pytest.mark.parametrize(
    "name", ["", "1ABC", "A-B", "A B", "A=B", "ÄPFEL", "X" * 129, "A\nB"]
)
def test_secret_invalid_name(secrets: SecretClient, name: str) -> None:
    with pytest.raises(InvalidArgument, match="letters, digits and '_'"):
        secrets.create(name, "value")


def test_secret_value_too_large(secrets: SecretClient) -> None:
    name = unique_name()
    value = "v" * (64 * 1024 + 1)
    with pytest.raises(InvalidArgument, match="65537 bytes") as raised:
        secrets.create(name, value)
    assert value not in str(raised.value)
    assert name not in [info.name for info in secrets.list()]


def test_secret_value_with_nul(secrets: SecretClient) -> None:
    with pytest.raises(InvalidArgument, match="NUL"):
        secrets.create(unique_name(), "a\0b")


def test_secret_value_at_maximum(address: str, secrets: SecretClient) -> None:
    name = unique_name()
    value = "m" * (64 * 1024)
    secrets.create(name, value)
    with Sandbox(address=address, secrets=[name]).create() as sb:
        code, output = printenv(sb, name)
    assert code == 0
    assert output == value + "\n"


# --------------------------------------------------------------- sandboxes


def test_sandbox_secret_in_every_process(address: str, secret: tuple[str, str]) -> None:
    name, value = secret
    with Sandbox(address=address, secrets=[name]).create() as sb:
        assert printenv(sb, name) == (0, value + "\n")
        # A second process, and one started through a shell, see it too.
        process = sb.process.exec("sh", "-c", f'printf %s "${name}"')
        assert process.wait() == 0
        assert process.stdout.read() == value


def test_sandbox_secret_overrides_env(address: str, secret: tuple[str, str]) -> None:
    name, value = secret
    settings = Sandbox(address=address, env={name: "plain"}, secrets=[name])
    with settings.create() as sb:
        assert printenv(sb, name) == (0, value + "\n")


def test_sandbox_spec_shows_names_only(address: str, secret: tuple[str, str]) -> None:
    name, value = secret
    with Sandbox(address=address, secrets=[name]).create() as sb:
        assert sb.status().spec.secrets == (name,)
        with grpc.insecure_channel(address) as channel:
            get = channel.unary_unary(
                "/engine.v1.SandboxService/Get",
                request_serializer=sandbox_pb2.GetRequest.SerializeToString,
                response_deserializer=lambda data: data,
            )
            listing = channel.unary_unary(
                "/engine.v1.SandboxService/List",
                request_serializer=sandbox_pb2.ListRequest.SerializeToString,
                response_deserializer=lambda data: data,
            )
            raw_get = get(sandbox_pb2.GetRequest(sandbox_id=sb.sandbox_id))
            raw_list = listing(sandbox_pb2.ListRequest())
        assert name.encode() in raw_get
        assert value.encode() not in raw_get
        assert value.encode() not in raw_list


def test_sandbox_unknown_secret_leaves_nothing(
    address: str, daemon: Daemon, secret: tuple[str, str]
) -> None:
    known, _ = secret
    missing = unique_name("MISSING")
    before = Sandbox.list(address=address)
    directories = daemon.settled_layers()
    with pytest.raises(NotFound, match=missing):
        Sandbox(address=address, secrets=[known, missing]).create()
    assert len(Sandbox.list(address=address)) == len(before)
    assert daemon.settled_layers() == directories


def test_sandbox_invalid_secret_name(address: str) -> None:
    with pytest.raises(InvalidArgument, match="'BAD-NAME'"):
        Sandbox(address=address, secrets=["BAD-NAME"]).create()


def test_sandbox_secrets_bare_string(address: str) -> None:
    with pytest.raises(InvalidArgument, match="list of secret names"):
        Sandbox(address=address, secrets="TOKEN")  # type: ignore[arg-type]


def test_sandbox_keeps_value_after_delete(
    address: str, secrets: SecretClient, secret: tuple[str, str]
) -> None:
    name, value = secret
    with Sandbox(address=address, secrets=[name]).create() as sb:
        secrets.delete(name)
        assert printenv(sb, name) == (0, value + "\n")


# ------------------------------------------------------------------- execs


def test_exec_secret_for_that_process_only(
    address: str, secret: tuple[str, str]
) -> None:
    name, value = secret
    with Sandbox(address=address).create() as sb:
        assert printenv(sb, name, secrets=[name]) == (0, value + "\n")
        assert printenv(sb, name) == (1, "")


def test_exec_secret_overrides_exec_env(address: str, secret: tuple[str, str]) -> None:
    name, value = secret
    with Sandbox(address=address).create() as sb:
        assert printenv(sb, name, env={name: "plain"}, secrets=[name]) == (
            0,
            value + "\n",
        )


def test_exec_unknown_secret(address: str) -> None:
    missing = unique_name("MISSING")
    with Sandbox(address=address).create() as sb:
        with pytest.raises(NotFound, match=missing):
            sb.process.exec("true", secrets=[missing])
        assert sb.process.list_processes() == {}


def test_exec_secret_over_grpc(address: str, secret: tuple[str, str]) -> None:
    name, value = secret
    with (
        Sandbox(address=address).create() as sb,
        grpc.insecure_channel(address) as channel,
    ):
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        events = stub.Exec(
            sandbox_pb2.ExecRequest(
                sandbox_id=sb.sandbox_id, argv=["printenv", name], secrets=[name]
            )
        )
        output = b"".join(
            event.output.data for event in events if event.HasField("output")
        )
    assert output == value.encode() + b"\n"


# ------------------------------------------------------------------ leaks


def test_secret_values_not_logged_or_stored(
    address: str, daemon: Daemon, secrets: SecretClient
) -> None:
    name, value = unique_name(), unique_value()
    secrets.create(name, value)
    with Sandbox(address=address, secrets=[name]).create() as sb:
        sb.process.exec("printenv", name, secrets=[name]).wait()
        with pytest.raises(NotFound):
            sb.process.exec("true", secrets=[name, unique_name("MISSING")])
    with pytest.raises(AlreadyExists):
        secrets.create(name, value)
    with pytest.raises(InvalidArgument):
        secrets.create(name, value + "\0", overwrite=True)
    assert value not in daemon.log()
    database = daemon.data_dir / "engine.db"
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    # The daemon writes sandbox rows within a fraction of a second.
    deadline = time.monotonic() + 5
    while True:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            specs = [row[0] for row in db.execute("SELECT spec FROM sandboxes")]
        if any(name in spec for spec in specs) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert any(name in spec for spec in specs)
    assert not any(value in spec for spec in specs)


# -------------------------------------------------------------------- CLI


def test_cli_secret_create_from_pipe(
    cli: CliRunner, address: str, secrets: SecretClient
) -> None:
    name = unique_name()
    # A pipe's bytes are the value exactly, the trailing newline included.
    result = cli("secret", "create", name, input="line one\nline two\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{name}\n"
    with Sandbox(address=address, secrets=[name]).create() as sb:
        process = sb.process.exec("sh", "-c", f'printf %s "${name}"')
        process.wait()
        assert process.stdout.read() == "line one\nline two\n"


def test_cli_secret_create_from_terminal(
    cli_env: dict[str, str], address: str, secrets: SecretClient
) -> None:
    name = unique_name()
    controller, terminal = os.openpty()
    try:
        # A new session has no controlling terminal, so getpass reads the pty
        # on stdin rather than the terminal of the person running the tests.
        process = subprocess.Popen(
            [str(ENGINE_BIN), "secret", "create", name],
            env=cli_env,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        os.close(terminal)
        terminal = -1
        # getpass flushes pending input when it turns echo off, so type only
        # after its prompt.
        assert process.stderr is not None
        prompt = b""
        while not prompt.endswith(b"value: "):
            data = os.read(process.stderr.fileno(), 64)
            assert data, f"no prompt; stderr so far: {prompt!r}"
            prompt += data
        os.write(controller, b"typed value\n")
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    assert process.returncode == 0, stderr
    assert stdout.decode() == f"{name}\n"
    with Sandbox(address=address, secrets=[name]).create() as sb:
        process_in_sandbox = sb.process.exec("sh", "-c", f'printf %s "${name}"')
        process_in_sandbox.wait()
        assert process_in_sandbox.stdout.read() == "typed value"


def test_cli_secret_ls_and_rm(cli: CliRunner, secret: tuple[str, str]) -> None:
    name, value = secret
    listing = cli("secret", "ls")
    assert listing.returncode == 0, listing.stderr
    assert name in listing.stdout
    assert value not in listing.stdout
    as_json = cli("secret", "ls", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert name in as_json.stdout
    assert value not in as_json.stdout
    removed = cli("secret", "rm", name)
    assert removed.returncode == 0, removed.stderr
    again = cli("secret", "rm", name)
    assert again.returncode == 1
    assert f"secret {name!r} not found" in again.stderr


def test_cli_secret_create_taken_and_overwrite(
    cli: CliRunner, secret: tuple[str, str]
) -> None:
    name, _ = secret
    taken = cli("secret", "create", name, input="x")
    assert taken.returncode == 1
    assert "already exists" in taken.stderr
    replaced = cli("secret", "create", "--overwrite", name, input="y")
    assert replaced.returncode == 0, replaced.stderr


def test_cli_secret_invalid_name(cli: CliRunner) -> None:
    result = cli("secret", "create", "9LIVES", input="x")
    assert result.returncode == 1
    assert "invalid secret name '9LIVES'" in result.stderr
    assert "not starting with a digit" in result.stderr


def test_cli_run_with_secret(cli: CliRunner, secret: tuple[str, str]) -> None:
    name, value = secret
    result = cli("run", "--secret", name, "--", "printenv", name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == value + "\n"


def test_cli_exec_with_secret(cli: CliRunner, secret: tuple[str, str]) -> None:
    name, value = secret
    created = cli("sandbox", "create")
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    try:
        result = cli(
            "sandbox", "exec", "--secret", name, sandbox_id, "--", "printenv", name
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == value + "\n"
    finally:
        cli("sandbox", "rm", sandbox_id)


# --------------------------------------------------------------- embedded


def test_embedded_engine_secrets(embedded: EmbeddedEngine) -> None:
    name, value = unique_name(), unique_value()
    with SecretClient(embedded.address) as client:
        client.create(name, value)
        with Sandbox(address=embedded.address, secrets=[name]).create() as sb:
            assert printenv(sb, name) == (0, value + "\n")
        client.delete(name)


def test_aio_sandbox_and_exec_secrets(address: str, secret: tuple[str, str]) -> None:
    import asyncio

    from engine.sdk.aio import AsyncSandbox

    name, value = secret

    async def scenario() -> tuple[str, str, str]:
        async with await AsyncSandbox(address=address, secrets=[name]).create() as sb:
            every = await sb.process.exec("printenv", name)
            await every.wait()
            async with await AsyncSandbox(address=address).create() as plain:
                only = await plain.process.exec("printenv", name, secrets=[name])
                await only.wait()
                missing = await plain.process.exec("printenv", name)
                await missing.wait()
                return (
                    await every.stdout.read(),
                    await only.stdout.read(),
                    await missing.stdout.read(),
                )

    every, only, missing = asyncio.run(scenario())
    assert every == value + "\n"
    assert only == value + "\n"
    assert missing == ""
