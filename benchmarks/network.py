"""`python -m benchmarks.network`: what sandbox networking costs.

    sudo .venv/bin/python -m benchmarks.network --update-docs

Two measurements, in one run on one embedded Engine, medians side by side:

- create latency of a sandbox with a network (veth, address, nftables chain)
  against a loopback-only one (``block_network=True``);
- TCP throughput from the host to a sink on 127.0.0.1 inside a sandbox
  through an exposed port, against the same sink on the host's loopback.
  The port of a networked sandbox takes the kernel path (DNAT through the
  veth pair), and that of a loopback-only sandbox goes through the splice
  forwarder. For reference it also measures the kernel's own path into a
  network namespace through a veth pair with no NAT: a namespace and veth of
  its own on 198.19.255.0/30, removed at the end.

With ``--update-docs`` the report replaces the text between the
``network:begin`` and ``network:end`` markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.report import replace_section
from engine.config import Config
from engine.core.engine import Engine
from engine.core.models import SandboxSpec, Stream

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- network:begin -->"
END = "<!-- network:end -->"
# Targets: networking adds at most this much to the median create latency,
# and an exposed port carries at least this fraction of loopback throughput.
CREATE_TARGET_MS = 3.0
THROUGHPUT_TARGET = 0.7
CHUNK = 1 << 20

# Accepts one connection on (host, port), reads until the client closes its
# side, then sends one byte back, so the client's timer covers every byte.
SINK = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    client, _ = server.accept()
    buffer = bytearray(1 << 20)
    while client.recv_into(buffer):
        pass
    client.sendall(b"k")
    client.close()
"""


@dataclass(frozen=True)
class Results:
    create_network_ms: list[float]
    create_loopback_ms: list[float]
    direct_mib_s: list[float]
    exposed_mib_s: list[float]
    forwarder_mib_s: list[float]
    veth_mib_s: list[float]


def _median(values: list[float]) -> float:
    return statistics.median(values)


async def _time_creates(
    engine: Engine, iterations: int, pause: float
) -> tuple[list[float], list[float]]:
    timings: dict[bool, list[float]] = {False: [], True: []}
    # Warm both pools and the image cache; the first samples are not kept.
    for block in (False, True, False, True):
        info = await engine.create_sandbox(SandboxSpec(block_network=block))
        await engine.terminate_sandbox(info.sandbox_id)
        await asyncio.sleep(pause)
    for _ in range(iterations):
        # Interleaved, so both kinds see the same machine load.
        for block in (False, True):
            start = time.perf_counter()
            info = await engine.create_sandbox(SandboxSpec(block_network=block))
            timings[block].append((time.perf_counter() - start) * 1000)
            await engine.terminate_sandbox(info.sandbox_id)
            # Time for the pool to refill, as it does between requests.
            await asyncio.sleep(pause)
    return timings[False], timings[True]


# Sends SIZE bytes to HOST:PORT and prints MiB/s until the sink's reply.
CLIENT = """
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = memoryview(bytes(1 << 20))
with socket.create_connection((host, port), timeout=60) as sock:
    start = time.perf_counter()
    left = size
    while left:
        left -= sock.send(payload[: min(left, 1 << 20)])
    sock.shutdown(socket.SHUT_WR)
    if sock.recv(1) != b"k":
        sys.exit("the sink did not confirm the transfer")
    print(size / (1 << 20) / (time.perf_counter() - start))
"""


def _send(host: str, port: int, size: int) -> float:
    """Run the client in its own process, as a user of the URL would, and return MiB/s.

    A client thread in this process would compete with the forwarder's
    threads for the GIL.
    """
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, host, str(port), str(size)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"throughput client failed: {result.stderr.strip()}")
    return float(result.stdout)


def _wait_listening(read: callable, timeout: float = 10) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    output = b""
    while b"listening" not in output:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sink did not start: {output!r}")
        output += read()
        time.sleep(0.02)


async def _start_inside_sink(engine: Engine, spec: SandboxSpec) -> tuple[str, str]:
    """Create a sandbox running SINK on 127.0.0.1:9000; return its id and URL."""
    info = await engine.create_sandbox(spec)
    try:
        process = await engine.exec(
            info.sandbox_id, ["python3", "-c", SINK, "127.0.0.1", "9000"]
        )
        offset = 0
        output = b""
        deadline = time.monotonic() + 10
        while b"listening" not in output:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sandbox sink did not start: {output!r}")
            async for chunk in engine.read_output(
                info.sandbox_id,
                process.pid,
                Stream.STDOUT,
                offset=offset,
                follow=False,
            ):
                output += chunk.data
                offset = chunk.offset + len(chunk.data)
            await asyncio.sleep(0.02)
        url = await engine.expose_port(info.sandbox_id, 9000)
    except BaseException:
        await engine.terminate_sandbox(info.sandbox_id)
        raise
    return info.sandbox_id, url


async def _time_throughput(
    engine: Engine, size: int, repeats: int
) -> tuple[list[float], list[float], list[float]]:
    """Return MiB/s to loopback, through the kernel path and through the forwarder."""
    loop = asyncio.get_running_loop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    direct = subprocess.Popen(
        [sys.executable, "-c", SINK, "127.0.0.1", str(port)], stdout=subprocess.PIPE
    )
    sandboxes: list[str] = []
    try:
        assert direct.stdout is not None
        os.set_blocking(direct.stdout.fileno(), False)
        _wait_listening(lambda: direct.stdout.read() or b"")  # type: ignore[union-attr]
        # No CPU quota on the sandboxes: the rows measure the forwarding
        # paths, not the sink's cgroup, and the host's sink has no quota
        # either. A networked sandbox's port takes the kernel path, and a
        # loopback-only one's goes through the forwarder.
        urls = []
        for block in (False, True):
            sandbox_id, url = await _start_inside_sink(
                engine, SandboxSpec(cpu=None, block_network=block)
            )
            sandboxes.append(sandbox_id)
            forwarder = engine.sandboxes[sandbox_id].forwarders[9000]
            if forwarder.kernel_path == block:
                raise RuntimeError(
                    f"port 9000 of {sandbox_id} (block_network={block}) "
                    f"has kernel_path={forwarder.kernel_path}; see the log"
                )
            urls.append(urlsplit(url))
        rates: list[list[float]] = [[], [], []]
        targets = [("127.0.0.1", port)] + [(url.hostname, url.port) for url in urls]
        for _ in range(repeats):
            # Alternated, so every path runs under the same machine load.
            for rate, (host, target_port) in zip(rates, targets, strict=True):
                rate.append(
                    await loop.run_in_executor(None, _send, host, target_port, size)
                )
    finally:
        for sandbox_id in sandboxes:
            await engine.terminate_sandbox(sandbox_id)
        direct.kill()
        direct.wait()
    return rates[0], rates[1], rates[2]


def _time_veth(size: int, repeats: int) -> list[float]:
    """Return MiB/s into a namespace of this benchmark's own through a veth pair."""
    from pyroute2 import IPRoute

    host_ifname = f"bv{os.getpid() % 100000:05d}"
    sink = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-c", VETH_SINK, SINK],
        stdout=subprocess.PIPE,
    )
    try:
        assert sink.stdout is not None
        # Until unshare(1) has run, its pid is still in this namespace, and
        # the peer would land here.
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{sink.pid}/ns/net") == own:
            if time.monotonic() > deadline:
                raise RuntimeError("the sink did not enter a new network namespace")
            time.sleep(0.01)
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=host_ifname,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_pid": sink.pid},
            )
            index = ipr.link_lookup(ifname=host_ifname)[0]
            ipr.addr("add", index=index, address=VETH_HOST, prefixlen=30)
            ipr.link("set", index=index, state="up")
        os.set_blocking(sink.stdout.fileno(), False)
        _wait_listening(lambda: sink.stdout.read() or b"")  # type: ignore[union-attr]
        return [_send(VETH_PEER, 9000, size) for _ in range(repeats)]
    finally:
        sink.kill()
        sink.wait()
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=host_ifname)
            if found:
                ipr.link("del", index=found[0])


VETH_HOST = "198.19.255.1"
VETH_PEER = "198.19.255.2"
# Runs in a new network namespace: waits for eth0, configures it, then runs
# the sink code passed as argv[1] on 0.0.0.0:9000.
VETH_SINK = f"""
import socket, sys, time
from pyroute2 import IPRoute
with IPRoute() as ipr:
    while not ipr.link_lookup(ifname="eth0"):
        time.sleep(0.01)
    for name in ("lo", "eth0"):
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
    ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0],
             address="{VETH_PEER}", prefixlen=30)
code = sys.argv[1]
sys.argv = ["sink", "0.0.0.0", "9000"]
exec(code)
"""


async def measure(
    iterations: int, size_mib: int, repeats: int, pause: float
) -> Results:
    work = Path(tempfile.mkdtemp(prefix="engine-bench-net-", dir="/tmp"))
    work.chmod(0o755)
    engine = Engine(Config.from_data_dir(work))
    try:
        await engine.start()
        network, loopback = await _time_creates(engine, iterations, pause)
        direct, exposed, forwarder = await _time_throughput(
            engine, size_mib * CHUNK, repeats
        )
    finally:
        await engine.close()
        shutil.rmtree(work, ignore_errors=True)
    # pyroute2's synchronous API runs an event loop of its own, so not on this one.
    loop = asyncio.get_running_loop()
    veth = await loop.run_in_executor(None, _time_veth, size_mib * CHUNK, repeats)
    return Results(network, loopback, direct, exposed, forwarder, veth)


def render(results: Results, command: str) -> str:
    network = _median(results.create_network_ms)
    loopback = _median(results.create_loopback_ms)
    direct = _median(results.direct_mib_s)
    veth = _median(results.veth_mib_s)
    added = network - loopback
    create_ok = "met" if added <= CREATE_TARGET_MS else "missed"
    load = os.getloadavg()[0]
    machine = (
        f"{platform.node()}, Linux {platform.release()}, {os.cpu_count()} cores,"
        f" 1-minute load average {load:.1f} at the end"
    )
    repeats = len(results.direct_mib_s)
    rows = [
        f"Command: `{command}` on {machine}.",
        "",
        "| measurement | with network | baseline | difference | target |",
        "|---|---|---|---|---|",
        f"| create, median of {len(results.create_network_ms)}"
        f" | {network:.2f} ms | {loopback:.2f} ms (loopback only)"
        f" | {added:+.2f} ms | +{CREATE_TARGET_MS:.0f} ms or less: {create_ok} |",
    ]
    for label, samples in (
        ("networked sandbox, kernel path", results.exposed_mib_s),
        ("loopback-only sandbox, splice forwarder", results.forwarder_mib_s),
    ):
        rate = _median(samples)
        ratio = rate / direct
        ratio_ok = "met" if ratio >= THROUGHPUT_TARGET else "missed"
        rows.append(
            f"| TCP throughput, median of {repeats}"
            f" | {rate:.0f} MiB/s (exposed port, {label})"
            f" | {direct:.0f} MiB/s (loopback)"
            f" | {ratio:.2f}x | {THROUGHPUT_TARGET}x or more: {ratio_ok} |"
        )
    rows.append(
        f"| for reference: TCP through a veth pair, no NAT"
        f" | {veth:.0f} MiB/s | {direct:.0f} MiB/s (loopback)"
        f" | {veth / direct:.2f}x | |"
    )
    return "\n".join([*rows, ""])


def update_docs(path: Path, report: str) -> None:
    """Replace the text between the network markers of ``path`` with ``report``."""
    try:
        replace_section(path, BEGIN, END, report)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.network",
        description="Measure sandbox create latency with and without a network,"
        " and TCP throughput through an exposed port against loopback.",
    )
    parser.add_argument(
        "--iterations", type=int, default=30, help="creates of each kind (default 30)"
    )
    parser.add_argument(
        "--size-mib", type=int, default=512, help="MiB per transfer (default 512)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="transfers per path (default 5)"
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.2,
        help="seconds between creates, for the pool to refill (default 0.2)",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="write the report into docs/benchmarks.md between the network markers",
    )
    parser.add_argument(
        "--docs", type=Path, default=DEFAULT_DOCS, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    for name in ("iterations", "size_mib", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(
        measure(args.iterations, args.size_mib, args.repeats, args.pause)
    )
    command = "python -m benchmarks.network " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = render(results, command.strip())
    print(report)
    if args.update_docs:
        update_docs(args.docs, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
