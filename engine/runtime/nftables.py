"""nftables through libnftables, the library behind the `nft` command.

``Nft.run`` hands one text batch (the syntax of `nft -f`) to
``nft_run_cmd_from_buffer``. The kernel applies a batch as one transaction,
so a batch either takes effect whole or not at all, and a failed batch
leaves the ruleset as it was. The Debian package python3-nftables wraps the
same library but is not installable into a virtualenv, so this module loads
libnftables.so.1 with ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
from typing import Any

from engine.errors import EngineError

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_HANDLE = 1 << 3
NFT_CTX_OUTPUT_JSON = 1 << 4

_LIBRARY = "libnftables.so.1"


class NftError(EngineError):
    """A batch that libnftables rejected; the message carries nft's own error text."""


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("nftables") or _LIBRARY
    try:
        library = ctypes.CDLL(name, use_errno=True)
    except OSError as error:
        raise NftError(
            f"cannot load {_LIBRARY}: {error}; install the libnftables1 package"
        ) from error
    library.nft_ctx_new.restype = ctypes.c_void_p
    library.nft_ctx_new.argtypes = [ctypes.c_uint32]
    library.nft_ctx_free.argtypes = [ctypes.c_void_p]
    library.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    library.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    library.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    library.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    library.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    library.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    library.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    library.nft_run_cmd_from_buffer.restype = ctypes.c_int
    library.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return library


class Nft:
    """One libnftables context; ``run`` is safe to call from several threads."""

    def __init__(self) -> None:
        self._library = _load()
        self._ctx = self._library.nft_ctx_new(NFT_CTX_DEFAULT)
        if not self._ctx:
            raise NftError("nft_ctx_new failed")
        self._library.nft_ctx_buffer_output(self._ctx)
        self._library.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()

    def run(self, commands: str, *, json_output: bool = False) -> str:
        """Run one batch of nft commands as a single transaction; return its output."""
        with self._lock:
            if self._ctx is None:
                raise NftError("the nftables context is closed")
            flags = NFT_CTX_OUTPUT_JSON if json_output else 0
            self._library.nft_ctx_output_set_flags(self._ctx, flags)
            status = self._library.nft_run_cmd_from_buffer(self._ctx, commands.encode())
            output = self._library.nft_ctx_get_output_buffer(self._ctx) or b""
            error = self._library.nft_ctx_get_error_buffer(self._ctx) or b""
        if status != 0:
            first = commands.strip().splitlines()[0] if commands.strip() else ""
            raise NftError(
                f"nft batch starting with {first!r} failed: "
                f"{error.decode(errors='replace').strip()}"
            )
        return output.decode(errors="replace")

    def list_json(self, command: str) -> list[dict[str, Any]]:
        """Run a `list ...` command and return the "nftables" array of its JSON."""
        text = self.run(command, json_output=True)
        if not text.strip():
            return []
        return json.loads(text).get("nftables", [])

    def table_names(self, family: str) -> list[str]:
        """Return the names of every table of ``family`` (inet, ip, bridge ...)."""
        names = []
        for item in self.list_json(f"list tables {family}"):
            table = item.get("table")
            if table is not None:
                names.append(table["name"])
        return names

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._library.nft_ctx_free(self._ctx)
                self._ctx = None
