"""The wire format of the daemon's direct socket.

Besides gRPC, the daemon serves SandboxService's unary and server-streaming
methods on a second unix socket, the gRPC socket's path plus ``.direct``, with
the same protobuf messages in plain length-prefixed frames. A call there skips
the thread hand-offs inside gRPC's server and client, which cost about 1 ms
per call after an idle pause. Both sockets have mode 0600, so both admit only
root, and a token, when sent, selects the workspace as on gRPC.

A connection carries one call at a time. The client sends a request frame:

    REQUEST header: body length, method name length, token length (u32, u16, u16)
    method name (ASCII, such as "Run"), token (UTF-8, may be empty), body

and the daemon replies with zero or more MESSAGE frames, then one END frame:

    REPLY header: payload length (u32), kind (u8)
    MESSAGE payload: one serialized response message
    END payload: the status code's name (ASCII), a NUL byte, the details (UTF-8)

The status is "OK" with empty details on success. Closing the connection
before the END frame cancels the call, as cancelling a gRPC call does. So
does shutting down only the client's write side (``shutdown(SHUT_WR)``, as
``nc -N`` does), because the daemon reads EOF as a hangup.
"""

from __future__ import annotations

import struct

SOCKET_SUFFIX = ".direct"

REQUEST_HEADER = struct.Struct("<IHH")
REPLY_HEADER = struct.Struct("<IB")

MESSAGE = 0
END = 1

# Largest method name and token the daemon reads, in bytes.
MAX_METHOD_BYTES = 64
MAX_TOKEN_BYTES = 4096


def socket_path_for(grpc_socket_path: str) -> str:
    """Return the direct socket's path for the gRPC socket at ``grpc_socket_path``."""
    return grpc_socket_path + SOCKET_SUFFIX


def encode_request(method: str, token: str | None, body: bytes) -> bytes:
    """Return the request frame that calls ``method`` with the serialized ``body``."""
    method_bytes = method.encode("ascii")
    token_bytes = (token or "").encode()
    header = REQUEST_HEADER.pack(len(body), len(method_bytes), len(token_bytes))
    return b"".join((header, method_bytes, token_bytes, body))


def encode_message(payload: bytes) -> bytes:
    """Return the MESSAGE frame that carries the serialized response ``payload``."""
    return REPLY_HEADER.pack(len(payload), MESSAGE) + payload


def encode_end(code: str, details: str = "") -> bytes:
    """Return the END frame with status ``code``, such as "OK" or "NOT_FOUND"."""
    payload = code.encode("ascii") + b"\0" + details.encode()
    return REPLY_HEADER.pack(len(payload), END) + payload


def decode_end(payload: bytes) -> tuple[str, str]:
    """Return the status code's name and the details of an END frame's payload."""
    code, _, details = payload.partition(b"\0")
    return code.decode("ascii", errors="replace"), details.decode(errors="replace")
