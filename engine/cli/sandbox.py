"""The `engine run` and `engine sandbox ...` commands, all clients of the SDK."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from engine import errors
from engine.cli.common import (
    EXIT_OOM,
    EXIT_TIMEOUT,
    add_limit_options,
    command_argv,
    fail,
    forward_stdin,
    parse_env,
    parse_labels,
    parse_signal,
    print_json,
    print_table,
    write_output,
)
from engine.cli.secret import SECRET_HELP, add_secret_option
from engine.cli.volume import add_volume_option, parse_volume_options
from engine.core.models import ExitReason, SandboxInfo, SandboxState, Stream
from engine.sdk.client import (
    ADDRESS_ENVIRONMENT_VARIABLE,
    Client,
    check_health,
    error_from_rpc,
    resolve_address,
)
from engine.sdk.sandbox import Sandbox, SandboxInstance, SandboxProcess
from engine.server import convert
from engine.v1 import sandbox_pb2 as pb

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ parsers


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """Add `run` and `sandbox` to the main parser; ``common`` has the global options."""
    run = subparsers.add_parser(
        "run",
        parents=[common],
        help="run one command in a new sandbox and remove the sandbox afterwards",
        description="Create a sandbox, run CMD in it with its output on this"
        " terminal, and terminate the sandbox when CMD exits or on Ctrl-C. Exits"
        " with CMD's exit status, 124 when --timeout killed it, and 137 when the"
        " kernel killed it for exceeding --memory. Uses the daemon when one"
        " responds at the default socket, and otherwise runs an engine in this"
        " process for the duration of CMD.",
    )
    add_limit_options(run)
    add_volume_option(run)
    add_secret_option(run, SECRET_HELP)
    add_network_options(run)
    run.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="kill CMD and its process group after this many seconds (default: none)",
    )
    run.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="send this terminal's stdin to CMD (default: CMD reads /dev/null)",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    run.set_defaults(func=run_command)

    sandbox = subparsers.add_parser(
        "sandbox",
        parents=[common],
        help="create, list, use and remove long-lived sandboxes",
        description="Manage sandboxes on the daemon (see `engine serve`).",
    )
    commands = sandbox.add_subparsers(
        dest="sandbox_command", metavar="COMMAND", required=True
    )

    create = commands.add_parser(
        "create",
        parents=[common],
        help="create a sandbox and print its id",
        description="Create a sandbox that runs until `engine sandbox rm` or until"
        " its TTL of inactivity ends.",
    )
    add_limit_options(create)
    add_volume_option(create)
    add_secret_option(create, SECRET_HELP + " (every process of the sandbox)")
    add_network_options(create)
    create.add_argument("--name", default="", help="name shown by ls (default: none)")
    create.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="label for filtering; repeat for more",
    )
    create.add_argument(
        "--ttl",
        type=float,
        metavar="SECONDS",
        help="terminate after this many seconds without an exec or stdin write;"
        " 0 means never (default: 600)",
    )
    create.add_argument("--json", action="store_true", help="print the sandbox as JSON")
    create.set_defaults(func=create_command)

    listing = commands.add_parser(
        "ls",
        parents=[common],
        help="list sandboxes",
        description="List the daemon's running sandboxes.",
    )
    listing.add_argument(
        "-a", "--all", action="store_true", help="include terminated sandboxes"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=ls_command)

    execute = commands.add_parser(
        "exec",
        parents=[common],
        help="run a command in a sandbox",
        description="Run CMD in sandbox ID with its output on this terminal, and"
        " exit with its exit status (124 on --timeout, 137 on out of memory).",
    )
    execute.add_argument("sandbox_id", metavar="ID", help="sandbox id, sb-...")
    execute.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="kill CMD and its process group after this many seconds (default: none)",
    )
    execute.add_argument(
        "--env",
        action="append",
        metavar="NAME=VALUE",
        help="environment variable added for CMD; repeat for more",
    )
    add_secret_option(execute, SECRET_HELP + " (CMD only)")
    execute.add_argument(
        "--workdir",
        metavar="DIR",
        help="working directory of CMD (default: the sandbox's workdir)",
    )
    execute.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="send this terminal's stdin to CMD (default: CMD reads /dev/null)",
    )
    # "*" rather than REMAINDER, because REMAINDER after the ID positional
    # would also take the options that follow the ID.
    execute.add_argument(
        "command",
        nargs="*",
        metavar="-- CMD [ARG...]",
        help="command to run; put it after -- when it has options of its own",
    )
    execute.set_defaults(func=exec_command)

    logs = commands.add_parser(
        "logs",
        parents=[common],
        help="print the output of a process",
        description="Print what process PID of sandbox ID wrote to stdout and"
        " stderr, as far as the daemon still buffers it.",
    )
    logs.add_argument("sandbox_id", metavar="ID", help="sandbox id, sb-...")
    logs.add_argument(
        "pid", metavar="PID", type=int, help="process id inside the sandbox"
    )
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new output until the process closes its streams",
    )
    logs.add_argument(
        "--stream",
        choices=["stdout", "stderr", "both"],
        default="both",
        help="which output to print (default: both)",
    )
    logs.set_defaults(func=logs_command)

    kill = commands.add_parser(
        "kill",
        parents=[common],
        help="send a signal to a process",
        description="Send a signal to the process group of process PID in sandbox ID.",
    )
    kill.add_argument("sandbox_id", metavar="ID", help="sandbox id, sb-...")
    kill.add_argument(
        "pid", metavar="PID", type=int, help="process id inside the sandbox"
    )
    kill.add_argument(
        "-s",
        "--signal",
        default="KILL",
        help="signal name or number, such as TERM or 15 (default: KILL)",
    )
    kill.set_defaults(func=kill_command)

    processes = commands.add_parser(
        "ps",
        parents=[common],
        help="list the processes of a sandbox",
        description="List every process started in sandbox ID, running and exited.",
    )
    processes.add_argument("sandbox_id", metavar="ID", help="sandbox id, sb-...")
    processes.add_argument("--json", action="store_true", help="print a JSON array")
    processes.set_defaults(func=ps_command)

    stats = commands.add_parser(
        "stats",
        parents=[common],
        help="print the resource usage of a sandbox",
        description="Print CPU time, memory and process count of sandbox ID.",
    )
    stats.add_argument("sandbox_id", metavar="ID", help="sandbox id, sb-...")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=stats_command)

    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="print a sandbox as JSON",
        description="Print the settings and state of sandbox ID as JSON.",
    )
    inspect.add_argument("sandbox_id", metavar="ID", help="sandbox id, sb-...")
    inspect.set_defaults(func=inspect_command)

    remove = commands.add_parser(
        "rm",
        parents=[common],
        help="terminate sandboxes",
        description="Terminate each sandbox ID, killing its processes and"
        " removing its files.",
    )
    remove.add_argument(
        "sandbox_ids", metavar="ID", nargs="+", help="sandbox id, sb-..."
    )
    remove.set_defaults(func=rm_command)

    expose = commands.add_parser(
        "expose",
        parents=[common],
        help="forward a host TCP port to a port inside a sandbox",
        description="Forward a new TCP port on the daemon's host to PORT inside"
        " sandbox ID, and print its URL. The forward ends with the sandbox.",
    )
    expose.add_argument("sandbox_id", metavar="ID", help="sandbox id, sb-...")
    expose.add_argument("port", type=int, metavar="PORT", help="TCP port inside")
    expose.set_defaults(func=expose_command)

    urls = commands.add_parser(
        "urls",
        parents=[common],
        help="list the exposed ports of a sandbox",
        description="Print one line per exposed port of sandbox ID: the port"
        " inside and its URL.",
    )
    urls.add_argument("sandbox_id", metavar="ID", help="sandbox id, sb-...")
    urls.add_argument("--json", action="store_true", help="print a JSON object")
    urls.set_defaults(func=urls_command)


def add_network_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--block-network",
        action="store_true",
        help="give the sandbox loopback only: no egress, DNS included",
    )
    group.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        help="allow egress only to this IPv4 CIDR; repeat for more"
        " (default: every destination the daemon's uplinks reach)",
    )


# ------------------------------------------------------------------ helpers


def _sandbox_settings(args: argparse.Namespace, address: str | None) -> Sandbox:
    return Sandbox(
        image=args.image,
        cpu=args.cpu,
        memory=_memory_argument(args.memory),
        disk=_memory_argument(args.disk),
        pids=args.pids,
        env=parse_env(args.env),
        workdir=args.workdir,
        name=getattr(args, "name", ""),
        labels=parse_labels(getattr(args, "label", None)),
        ttl=getattr(args, "ttl", None),
        address=address,
        volumes=parse_volume_options(args.volume),
        secrets=getattr(args, "secret", None) or [],
        block_network=args.block_network,
        allow_list=args.allow,
    )


def _memory_argument(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def _connect(args: argparse.Namespace, sandbox_id: str) -> SandboxInstance:
    return Sandbox.connect(
        sandbox_id, address=resolve_address(args.address, args.data_dir)
    )


def _exec_events(client: Client, request: pb.ExecRequest) -> Iterator[pb.ExecEvent]:
    call = client.open_stream("Exec", request)
    try:
        yield from call
    except grpc.RpcError as error:
        raise error_from_rpc(error, client.address) from None
    finally:
        call.cancel()


def stream_exec(
    client: Client, request: pb.ExecRequest, *, interactive: bool
) -> pb.ExecExited:
    """Run one Exec, copy its output to this terminal and return its exit event."""
    outputs = {pb.STREAM_STDOUT: sys.stdout.buffer, pb.STREAM_STDERR: sys.stderr.buffer}
    sys.stdout.flush()
    with contextlib.closing(_exec_events(client, request)) as events:
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "started" and interactive:
                process = SandboxProcess(client, request.sandbox_id, event.started.pid)
                forward_stdin(process.stdin.write, process.stdin.close)
            elif kind == "output" and event.output.data:
                stream = outputs.get(event.output.stream, sys.stderr.buffer)
                write_output(stream, event.output.data)
            elif kind == "exit":
                return event.exit
    raise errors.InternalError("the daemon's Exec stream ended without an exit event")


def exit_status(
    exited: pb.ExecExited, *, timeout: float | None, memory_mib: int | None
) -> int:
    """Return the exit status for a finished command, printing why it was killed."""
    reason = convert.EXIT_REASONS_FROM_PROTO.get(exited.reason, ExitReason.NONE)
    if reason == ExitReason.TIMEOUT:
        print(f"engine: killed: timed out after {timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if reason == ExitReason.OOM:
        limit = f"limit {memory_mib} MiB" if memory_mib else "no limit set"
        print(f"engine: killed: out of memory ({limit})", file=sys.stderr)
        return EXIT_OOM
    if exited.exit_code < 0:
        return 1
    return exited.exit_code


def _exec_request(
    sandbox_id: str,
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | None,
    timeout: float | None,
    interactive: bool,
    secrets: list[str] | None = None,
) -> pb.ExecRequest:
    request = pb.ExecRequest(
        sandbox_id=sandbox_id,
        argv=argv,
        env=env,
        cwd=cwd or "",
        stdin=interactive,
        secrets=secrets or [],
    )
    if timeout is not None:
        request.timeout_seconds = timeout
    return request


# ----------------------------------------------------------------- commands


def run_command(args: argparse.Namespace) -> int:
    argv = command_argv(args.command)
    explicit = args.address or os.environ.get(ADDRESS_ENVIRONMENT_VARIABLE)
    address = resolve_address(args.address, args.data_dir)
    if explicit or check_health(address):
        return _run_with(args, argv, address)
    logger.info("no daemon responds at %s; starting an embedded engine", address)
    from engine.sdk.embedded import EmbeddedEngine

    with EmbeddedEngine(data_dir=args.data_dir) as embedded:
        return _run_with(args, argv, embedded.address)


# Exit status of `engine run` when the command does not exist, as in sh.
COMMAND_NOT_FOUND = 127


def _run_with(args: argparse.Namespace, argv: list[str], address: str) -> int:
    settings = _sandbox_settings(args, address)
    # The default ttl is kept: the running command counts as activity, and if
    # this process is killed with SIGKILL, the daemon reaps the sandbox a ttl
    # after the command ends.
    sandbox = settings.create()
    try:
        request = _exec_request(
            sandbox.sandbox_id,
            argv,
            env={},
            cwd=None,
            timeout=args.timeout,
            interactive=args.interactive,
        )
        try:
            exited = stream_exec(sandbox._client, request, interactive=args.interactive)
        except errors.NotFound as error:
            # As a shell does for a command it cannot find.
            print(f"engine: error: {error}", file=sys.stderr)
            return COMMAND_NOT_FOUND
        return exit_status(exited, timeout=args.timeout, memory_mib=settings.memory_mib)
    finally:
        try:
            sandbox.terminate()
        except errors.EngineError as error:
            logger.warning(
                "failed to terminate sandbox %s: %s", sandbox.sandbox_id, error
            )
        sandbox.close()


def create_command(args: argparse.Namespace) -> int:
    settings = _sandbox_settings(args, resolve_address(args.address, args.data_dir))
    sandbox = settings.create()
    try:
        if args.json:
            print_json(sandbox.status())
        else:
            print(sandbox.sandbox_id)
    finally:
        sandbox.close()
    return 0


def _age(seconds: float) -> str:
    elapsed = max(time.time() - seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if elapsed >= size:
            return f"{int(elapsed // size)}{unit}"
    return f"{int(elapsed)}s"


def _sandbox_row(info: SandboxInfo) -> list[str]:
    spec = info.spec
    state = info.state.value
    if info.reason.value:
        state = f"{state} ({info.reason.value})"
    return [
        info.sandbox_id,
        state,
        spec.image,
        spec.name or "-",
        f"{spec.cpu:g}" if spec.cpu is not None else "-",
        f"{spec.memory_mib}Mi" if spec.memory_mib is not None else "-",
        _age(info.created_at),
    ]


def ls_command(args: argparse.Namespace) -> int:
    sandboxes = Sandbox.list(address=resolve_address(args.address, args.data_dir))
    if not args.all:
        sandboxes = [
            info for info in sandboxes if info.state != SandboxState.TERMINATED
        ]
    if args.json:
        print_json(sandboxes)
        return 0
    header = ["SANDBOX ID", "STATE", "IMAGE", "NAME", "CPU", "MEMORY", "AGE"]
    print_table([_sandbox_row(info) for info in sandboxes], header)
    return 0


def exec_command(args: argparse.Namespace) -> int:
    argv = command_argv(args.command)
    sandbox = _connect(args, args.sandbox_id)
    try:
        request = _exec_request(
            sandbox.sandbox_id,
            argv,
            env=parse_env(args.env),
            cwd=args.workdir,
            timeout=args.timeout,
            interactive=args.interactive,
            secrets=args.secret,
        )
        exited = stream_exec(sandbox._client, request, interactive=args.interactive)
        memory_mib = None
        if exited.reason == pb.EXIT_REASON_OOM:
            memory_mib = sandbox.status().spec.memory_mib
        return exit_status(exited, timeout=args.timeout, memory_mib=memory_mib)
    finally:
        sandbox.close()


def _copy_stream(
    process: SandboxProcess, stream: Stream, follow: bool, failures: list[BaseException]
) -> None:
    reader = process.stdout if stream == Stream.STDOUT else process.stderr
    output = sys.stdout.buffer if stream == Stream.STDOUT else sys.stderr.buffer
    try:
        with contextlib.closing(reader.iter_bytes(follow=follow)) as chunks:
            for data in chunks:
                write_output(output, data)
    except BaseException as error:
        failures.append(error)


def logs_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args, args.sandbox_id)
    try:
        process = sandbox.process.get_process(args.pid)
        streams = [Stream.STDOUT, Stream.STDERR]
        if args.stream != "both":
            streams = [Stream(args.stream)]
        failures: list[BaseException] = []
        threads = [
            threading.Thread(
                target=_copy_stream,
                args=(process, stream, args.follow, failures),
                daemon=True,
            )
            for stream in streams
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
        if failures:
            raise failures[0]
    finally:
        sandbox.close()
    return 0


def kill_command(args: argparse.Namespace) -> int:
    number = parse_signal(args.signal)
    sandbox = _connect(args, args.sandbox_id)
    try:
        sandbox.process.get_process(args.pid).kill(number)
    finally:
        sandbox.close()
    return 0


def _process_row(info: Any) -> list[str]:
    return [
        str(info.pid),
        info.state.value,
        str(info.exit_code) if info.exit_code is not None else "-",
        info.signal or "-",
        info.reason.value or "-",
        " ".join(info.argv),
    ]


def ps_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args, args.sandbox_id)
    try:
        processes = list(sandbox.process.list_processes().values())
    finally:
        sandbox.close()
    if args.json:
        print_json(processes)
        return 0
    header = ["PID", "STATE", "EXIT", "SIGNAL", "REASON", "COMMAND"]
    print_table([_process_row(info) for info in processes], header)
    return 0


def stats_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args, args.sandbox_id)
    try:
        stats = sandbox.stats()
    finally:
        sandbox.close()
    if args.json:
        print_json(stats)
        return 0
    print(f"cpu          {stats.cpu_seconds:.3f} s")
    print(f"memory       {stats.memory_bytes / 2**20:.1f} MiB")
    print(f"memory peak  {stats.memory_peak_bytes / 2**20:.1f} MiB")
    print(f"disk         {stats.disk_bytes / 2**20:.1f} MiB")
    print(f"pids         {stats.pids}")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args, args.sandbox_id)
    try:
        print_json(sandbox.status())
    finally:
        sandbox.close()
    return 0


def expose_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args, args.sandbox_id)
    try:
        print(sandbox.expose_port(args.port))
    finally:
        sandbox.close()
    return 0


def urls_command(args: argparse.Namespace) -> int:
    sandbox = _connect(args, args.sandbox_id)
    try:
        urls = sandbox.list_urls()
    finally:
        sandbox.close()
    if args.json:
        print_json({str(port): url for port, url in sorted(urls.items())})
        return 0
    for port, url in sorted(urls.items()):
        print(f"{port}\t{url}")
    return 0


def rm_command(args: argparse.Namespace) -> int:
    status = 0
    with Client(resolve_address(args.address, args.data_dir)) as client:
        for sandbox_id in args.sandbox_ids:
            try:
                client.call("Terminate", pb.TerminateRequest(sandbox_id=sandbox_id))
            except errors.Unavailable:
                raise
            except errors.EngineError as error:
                status = fail(str(error))
                continue
            print(sandbox_id)
    return status
