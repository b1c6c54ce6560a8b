"""Property-based fuzzing of every RPC of the engine's gRPC API.

Requests are generated from the message descriptors of every service in
engine/v1, so an RPC added later is fuzzed without changes here. Field values
mix random data with boundary and hostile values: empty, huge, negative,
NaN, path traversal, /proc magic links, globs, control characters, and the id
of a real sandbox so that requests get past the id lookup. Undecodable wire
bytes, such as invalid UTF-8 in a string field, go through a raw channel.

The only acceptable outcomes are OK or a status that names a caller error.
After the run the daemon must still respond, and no sandbox created by a fuzzed
request may remain.

Examples are derandomized, so CI runs the same cases every time. Set
ENGINE_FUZZ_EXAMPLES to run more, with fresh random data.
"""

from __future__ import annotations

import importlib
import math
import os
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.v1
from engine.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.integration.conftest import (
    Daemon,
    make_data_dir,
    remove_data_dir,
    start_daemon,
)

EXTRA_EXAMPLES = int(os.environ.get("ENGINE_FUZZ_EXAMPLES", "0"))
EXAMPLES = EXTRA_EXAMPLES or 25
# Seconds one fuzzed call may take before it counts as stuck.
CALL_DEADLINE = 20.0
# The deepest nesting of message fields that a generated request reaches.
MAX_DEPTH = 3

ACCEPTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAUTHENTICATED,
}

HOSTILE_TEXT = [
    "",
    " ",
    ".",
    "..",
    "/",
    "//",
    "../../../../etc/shadow",
    "/etc/../../../../etc/shadow",
    "/proc/self/fd/3",
    "/proc/1/root/etc",
    "/proc/self/cwd",
    "/dev/../proc/kcore",
    "*",
    "**/*",
    "[",
    "\\",
    "\x00",
    "a\x00b",
    "\n",
    "-rf",
    "--help",
    "\u202e",
    "\U0001f600" * 100,
    "a" * 300,
    "/" + "a/" * 2500,
    "x" * 70_000,
    "sb-000000000000",
    "SIGKILL",
    "volume-name",
]
INT_BOUNDARIES = [0, 1, -1, 2, 255, 256, 4095, 65535, 2**31 - 1, -(2**31), 2**63 - 1]
FLOAT_BOUNDARIES = [0.0, -0.0, -1.0, 1e-300, 1e300, math.inf, -math.inf, math.nan]
# Wire bytes that protobuf cannot decode as any message: a truncated varint,
# and a length that runs past the end.
UNDECODABLE = [b"\x08\xff", b"\x0a\x7fshort"]


def _services() -> list[ServiceDescriptor]:
    services = []
    for module_info in pkgutil.iter_modules(engine.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"engine.v1.{module_info.name}")
        services.extend(module.DESCRIPTOR.services_by_name.values())
    return services


METHODS: list[MethodDescriptor] = [
    method for service in _services() for method in service.methods
]


def _method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _text(sandbox_id: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE_TEXT),
        st.just(sandbox_id),
        st.text(max_size=40),
    )


def _scalar(field: FieldDescriptor, sandbox_id: str) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _text(sandbox_id)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=64), st.just(b""), st.just(b"\xff" * 100_000)
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from(FLOAT_BOUNDARIES), st.floats(-1e6, 1e6))
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, len(field.enum_type.values) + 3)
    unsigned = kind in (
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
    )
    wide = kind in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    )
    bits = 64 if wide else 32
    low, high = (
        (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    )
    boundaries = [value for value in INT_BOUNDARIES if low <= value <= high]
    return st.one_of(st.sampled_from(boundaries), st.integers(low, high))


def _fill(
    draw: st.DrawFn,
    message: Message,
    descriptor: Descriptor,
    sandbox_id: str,
    depth: int,
) -> None:
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if is_message and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                continue
            entries = draw(
                st.dictionaries(
                    _scalar(key_field, sandbox_id),
                    _scalar(value_field, sandbox_id),
                    max_size=3,
                )
            )
            getattr(message, field.name).update(entries)
        elif is_message:
            if depth >= MAX_DEPTH or field.message_type.full_name.startswith(
                "google.protobuf."
            ):
                continue
            count = draw(st.integers(1, 3)) if _is_repeated(field) else 1
            for _ in range(count):
                if _is_repeated(field):
                    child = getattr(message, field.name).add()
                else:
                    child = getattr(message, field.name)
                    child.SetInParent()
                _fill(draw, child, field.message_type, sandbox_id, depth + 1)
        elif _is_repeated(field):
            values = draw(st.lists(_scalar(field, sandbox_id), max_size=3))
            getattr(message, field.name).extend(values)
        else:
            setattr(message, field.name, draw(_scalar(field, sandbox_id)))


def _is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


@st.composite
def requests(draw: st.DrawFn, descriptor: Descriptor, sandbox_id: str) -> Message:
    message = message_factory.GetMessageClass(descriptor)()
    _fill(draw, message, descriptor, sandbox_id, 0)
    return message


def _call(
    channel: grpc.Channel, method: MethodDescriptor, payloads: list[bytes]
) -> grpc.StatusCode:
    """Send ``payloads`` as the request (or the request stream) and drain the reply."""
    path = _method_path(method)
    raw: Callable[[bytes], bytes] = lambda data: data  # noqa: E731
    try:
        if method.client_streaming:
            call = channel.stream_unary(
                path, request_serializer=raw, response_deserializer=raw
            )
            call(iter(payloads), timeout=CALL_DEADLINE)
        elif method.server_streaming:
            call = channel.unary_stream(
                path, request_serializer=raw, response_deserializer=raw
            )
            for _ in call(payloads[0], timeout=CALL_DEADLINE):
                pass
        else:
            call = channel.unary_unary(
                path, request_serializer=raw, response_deserializer=raw
            )
            call(payloads[0], timeout=CALL_DEADLINE)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


class Target:
    """A real sandbox whose id the fuzzer uses, recreated if a request ends it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        self.sandbox_id = self._create()

    def _create(self) -> str:
        reply = self.stub.Create(sandbox_pb2.CreateRequest(), timeout=CALL_DEADLINE)
        return reply.sandbox.sandbox_id

    def ensure_running(self) -> None:
        reply = self.stub.Get(
            sandbox_pb2.GetRequest(sandbox_id=self.sandbox_id), timeout=CALL_DEADLINE
        )
        if reply.sandbox.state != sandbox_pb2.SANDBOX_STATE_RUNNING:
            self.sandbox_id = self._create()


def _running_ids(stub: Any) -> set[str]:
    listed = stub.List(sandbox_pb2.ListRequest(), timeout=CALL_DEADLINE)
    return {
        sandbox.sandbox_id
        for sandbox in listed.sandboxes
        if sandbox.state != sandbox_pb2.SANDBOX_STATE_TERMINATED
    }


def _terminate_new(stub: Any, keep: set[str]) -> None:
    for sandbox_id in _running_ids(stub) - keep:
        stub.Terminate(
            sandbox_pb2.TerminateRequest(sandbox_id=sandbox_id), timeout=CALL_DEADLINE
        )


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[Daemon]:
    # No warm sandboxes, so that every sandbox dir left belongs to a request.
    running = start_daemon(make_data_dir(), "--warm-pool", "0")
    try:
        yield running
    finally:
        status = running.stop()
        log = running.log()
        remove_data_dir(running)
        assert status == 0, f"daemon exited with {status}; log:\n{log}"


@pytest.fixture(scope="module")
def fuzz_channel(fuzz_daemon: Daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_daemon.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def target(fuzz_channel: grpc.Channel) -> Target:
    return Target(fuzz_channel)


def test_every_service_is_fuzzed() -> None:
    services = {method.containing_service.name for method in METHODS}
    assert "SandboxService" in services
    assert "FileService" in services
    assert "VolumeService" in services


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=not EXTRA_EXAMPLES,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("method", METHODS, ids=_method_path)
def test_fuzzed_request_gets_status(
    method: MethodDescriptor,
    fuzz_daemon: Daemon,
    fuzz_channel: grpc.Channel,
    target: Target,
) -> None:
    keep = {target.sandbox_id}
    codes: list[tuple[grpc.StatusCode, Message]] = []

    @FUZZ_SETTINGS
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        target.ensure_running()
        count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
        messages = [
            data.draw(requests(method.input_type, target.sandbox_id))
            for _ in range(count)
        ]
        code = _call(
            fuzz_channel, method, [message.SerializeToString() for message in messages]
        )
        _terminate_new(target.stub, keep | {target.sandbox_id})
        codes.append((code, messages[0]))
        assert code in ACCEPTED, (
            f"{_method_path(method)} returned {code} for {messages};"
            f" daemon log:\n{fuzz_daemon.log()[-4000:]}"
        )

    check()
    assert codes


def _invalid_utf8(descriptor: Descriptor) -> list[bytes]:
    """Return one payload per top-level string field, with invalid UTF-8 in it."""
    payloads = []
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            tag = (field.number << 3) | 2
            payloads.append(_varint(tag) + b"\x03a\xc3\x28")
    return payloads


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while value > 0x7F:
        encoded.append((value & 0x7F) | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


@pytest.mark.parametrize("method", METHODS, ids=_method_path)
def test_undecodable_request_rejected(
    method: MethodDescriptor, fuzz_channel: grpc.Channel, target: Target
) -> None:
    keep = {target.sandbox_id}
    for payload in UNDECODABLE + _invalid_utf8(method.input_type):
        code = _call(fuzz_channel, method, [payload])
        _terminate_new(target.stub, keep)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (payload, code)


def test_daemon_healthy_after_fuzzing(
    fuzz_daemon: Daemon, fuzz_channel: grpc.Channel, target: Target
) -> None:
    target.ensure_running()
    _terminate_new(target.stub, {target.sandbox_id})
    assert _running_ids(target.stub) == {target.sandbox_id}
    sandbox_dirs = os.listdir(fuzz_daemon.layers_dir())
    assert sandbox_dirs == [target.sandbox_id]
    reply = target.stub.Get(
        sandbox_pb2.GetRequest(sandbox_id=target.sandbox_id), timeout=CALL_DEADLINE
    )
    assert reply.sandbox.state == sandbox_pb2.SANDBOX_STATE_RUNNING
