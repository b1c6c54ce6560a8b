"""GrpcRuns in a process of its own, as a user's client would be.

The harness also runs the embedded engine on its own event loop. A gRPC client
thread in the same process would wait for the interpreter lock while that
loop works, and its timings would include the wait. ``ClientProcess`` starts
``python -m benchmarks.clientprocess ADDRESS``, which holds one ``GrpcRuns``
and times every call there; the harness only sends the name of the call and
receives the result, as pickles over the child's stdin and stdout.
"""

from __future__ import annotations

import pickle
import select
import subprocess
import sys
import traceback
from pathlib import Path
from typing import IO, Any

from benchmarks.engines import CALL_TIMEOUT, GrpcRuns

ROOT = Path(__file__).resolve().parents[1]
# Seconds the harness waits for one call, beyond the calls' own timeouts:
# a throughput sample runs many Create+Terminate pairs in a row.
REPLY_TIMEOUT = 20 * CALL_TIMEOUT


class ClientProcessError(RuntimeError):
    """A call that raised in the client process; the message has its traceback."""


def _serve(address: str, requests: IO[bytes], replies: IO[bytes]) -> None:
    runs = GrpcRuns(address)
    try:
        while True:
            try:
                name, arguments = pickle.load(requests)
            except EOFError:
                return
            try:
                reply = (True, getattr(runs, name)(*arguments))
            except Exception as error:
                detail = "".join(traceback.format_exception(error))
                reply = (False, f"{error}\n{detail}")
            pickle.dump(reply, replies)
            replies.flush()
    finally:
        runs.close()


class ClientProcess:
    """Proxies the timed calls of GrpcRuns to a client process."""

    def __init__(self, address: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.clientprocess", address],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def _call(self, name: str, *arguments: Any) -> Any:
        assert self._process.stdin is not None and self._process.stdout is not None
        pickle.dump((name, arguments), self._process.stdin)
        self._process.stdin.flush()
        ready, _, _ = select.select([self._process.stdout], [], [], REPLY_TIMEOUT)
        if not ready:
            raise TimeoutError(
                f"the gRPC client process did not finish {name} in {REPLY_TIMEOUT} s"
            )
        try:
            ok, result = pickle.load(self._process.stdout)
        except EOFError:
            code = self._process.wait()
            raise ClientProcessError(
                f"the gRPC client process exited with {code} during {name}"
            ) from None
        if not ok:
            raise ClientProcessError(result)
        return result

    def cold_start(self, block_network: bool = True) -> float:
        return self._call("cold_start", block_network)

    def start_exec_sandbox(self) -> None:
        self._call("start_exec_sandbox")

    def exec_round_trip(self, direct: bool = True) -> float:
        return self._call("exec_round_trip", direct)

    def exec_burst(self, count: int, direct: bool = True) -> Any:
        return self._call("exec_burst", count, direct)

    def run_round_trip(self, direct: bool = True) -> float:
        return self._call("run_round_trip", direct)

    def run_burst(self, count: int, direct: bool = True) -> Any:
        return self._call("run_burst", count, direct)

    def health_round_trip(self) -> float:
        return self._call("health_round_trip")

    def probe(self, argv: list[str], block_network: bool = True) -> str:
        return self._call("probe", argv, block_network)

    def throughput(self, clients: int, cycles: int, refill: float = 0.0) -> Any:
        return self._call("throughput", clients, cycles, refill)

    def close(self) -> None:
        """Close the client process's stdin, so it exits, and wait for it."""
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(CALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
