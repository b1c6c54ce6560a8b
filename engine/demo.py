"""A short tour: sandboxes running untrusted Python and shell code, with limits visible.

Run it with ``sudo .venv/bin/python -m engine.demo``. It uses the daemon named by
ENGINE_ADDRESS or at the default socket when one answers, and otherwise an
embedded engine that lives only as long as the demo.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

from engine.errors import EngineError, Unavailable
from engine.sdk.embedded import EmbeddedEngine
from engine.sdk.sandbox import Sandbox, SandboxInstance

UNTRUSTED_PYTHON = """
import os, socket
print("uid inside:", os.getuid(), "| hostname:", socket.gethostname())
print("processes visible:", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
try:
    open("/usr/bin/evil", "w")
except OSError as error:
    print("write to /usr:", error.strerror)
print("host /etc/shadow visible:", os.path.exists("/etc/shadow"))
"""

MEMORY_HOG = "x = bytearray(512 << 20); print('allocated 512 MiB')"
FORK_BOMB = """
import os, time
started = 0
try:
    while started < 200:
        if os.fork() == 0:
            os.closerange(0, 3)
            time.sleep(5)
            os._exit(0)
        started += 1
except OSError as error:
    print(f"fork failed after {started} processes: {error.strerror}")
"""


def _step(title: str) -> None:
    print(f"\n== {title}")


@contextlib.contextmanager
def _address() -> Iterator[str | None]:
    """Yield the daemon's address, or start an embedded engine for the demo."""
    try:
        Sandbox.list()
        yield None
        return
    except Unavailable:
        pass
    print("no daemon is running; starting an embedded engine for this demo")
    # A data dir of the demo's own, so that nothing stays behind afterwards.
    data_dir = tempfile.mkdtemp(prefix="engine-demo-")
    os.chmod(data_dir, 0o755)
    try:
        with EmbeddedEngine(data_dir) as embedded:
            yield embedded.address
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _show(sandbox: SandboxInstance, *argv: str) -> None:
    started = time.perf_counter()
    process = sandbox.process.exec(*argv)
    code = process.wait()
    elapsed = (time.perf_counter() - started) * 1000
    sys.stdout.write(process.stdout.read())
    sys.stdout.write(process.stderr.read())
    status = process.status()
    reason = f", {status.reason.value}" if status.reason.value != "exited" else ""
    print(f"-> exit {code}{reason} in {elapsed:.1f} ms")


def main() -> int:
    try:
        with _address() as address:
            _step("a sandbox with 1 CPU, 128 MiB of memory and 64 pids")
            started = time.perf_counter()
            spec = Sandbox(cpu=1.0, memory=128, pids=64, address=address)
            with spec.create() as sandbox:
                elapsed = (time.perf_counter() - started) * 1000
                print(f"created {sandbox.sandbox_id} in {elapsed:.1f} ms")

                _step("untrusted Python sees only its own sandbox")
                _show(sandbox, "python3", "-c", UNTRUSTED_PYTHON)

                _step("run_code")
                result = sandbox.process.run_code("print(sum(range(10**6)))")
                print(result.stdout.strip(), f"(exit {result.exit_code})")

                _step("memory limit: allocating 512 MiB in a 128 MiB sandbox")
                _show(sandbox, "python3", "-c", MEMORY_HOG)

                _step("pids limit: starting 200 background processes with 64 allowed")
                _show(sandbox, "python3", "-c", FORK_BOMB)

                _step("timeout: sleep 10 with a 1 s timeout")
                started = time.perf_counter()
                process = sandbox.process.exec("sleep", "10", timeout=1)
                code = process.wait()
                elapsed = time.perf_counter() - started
                reason = process.status().reason.value
                print(f"-> exit {code}, {reason} after {elapsed:.2f} s")

                _step("usage")
                stats = sandbox.stats()
                print(
                    f"cpu {stats.cpu_seconds:.2f} s, "
                    f"memory {stats.memory_bytes >> 20} MiB "
                    f"(peak {stats.memory_peak_bytes >> 20} MiB), pids {stats.pids}"
                )
            print(f"\nterminated {sandbox.sandbox_id}; nothing is left on the host")
    except EngineError as error:
        print(f"engine: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
