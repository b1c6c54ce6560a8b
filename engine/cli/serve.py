"""The `engine serve` command: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import asyncio

from engine.config import (
    DEFAULT_UID_BASE,
    DEFAULT_UID_COUNT,
    DEFAULT_WARM_POOL_SIZE,
    MAX_WARM_POOL_SIZE,
    Config,
)


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    serve = subparsers.add_parser(
        "serve",
        parents=[common],
        help="run the engine daemon in the foreground",
        description="Run the engine daemon until SIGTERM or SIGINT, which"
        " terminate every sandbox and exit with status 0. It serves gRPC on a"
        " unix socket with mode 0600 and, with --listen, on TCP.",
    )
    serve.add_argument(
        "--socket",
        metavar="PATH",
        help="unix socket for gRPC (default: engine.sock in the data dir); the"
        " direct socket for the SDK is PATH.direct",
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="also listen on this TCP address, where every call needs a bearer"
        " token from `engine token create`; port 0 picks a free port (default:"
        " no TCP)",
    )
    serve.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve the Beam-compatible HTTP routes (deployed endpoints,"
        " task queues, Tasks API) on this address; every route requires a token"
        " from `engine token create`; port 0 picks a free port (default: no HTTP)",
    )
    serve.add_argument(
        "--allow-endpoint",
        action="append",
        default=[],
        metavar="CIDR",
        help="let token holders name bucket endpoints and callback URLs in this"
        " network besides public addresses, such as 127.0.0.1/32 for a local S3"
        " server; repeatable. Callers on the unix socket are not limited",
    )
    serve.add_argument(
        "--uid-base",
        type=_uid_base,
        default=DEFAULT_UID_BASE,
        metavar="UID",
        help="host uid and gid that uid 0 in sandboxes maps to; 65536 ids from"
        " it are used, and no range in /etc/subuid or /etc/subgid may overlap"
        f" them. Images are built for one base (default: {DEFAULT_UID_BASE})",
    )
    serve.add_argument(
        "--subnet",
        metavar="CIDR",
        help="IPv4 subnet of the sandboxes' bridge (default: a free /16 in"
        " 10.0.0.0/8 that no host route overlaps)",
    )
    serve.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="IP",
        help="name server for the sandboxes' resolv.conf; repeat for more"
        " (default: none)",
    )
    serve.add_argument(
        "--uplink",
        action="append",
        default=[],
        metavar="IFNAME",
        help="host interface that sandbox egress may leave through, or 'auto'"
        " for those of the host's default routes; repeat for more. Replies"
        " arriving on it need net.ipv4.conf.IFNAME.forwarding=1 (default:"
        " none, so sandbox traffic stays on this host)",
    )
    serve.add_argument(
        "--block-network-by-default",
        action="store_true",
        help="give sandboxes that pass no --allow list loopback only",
    )
    serve.add_argument(
        "--expose-host",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address that exposed ports listen on (default: 127.0.0.1)",
    )
    serve.add_argument(
        "--warm-pool",
        type=_warm_pool_size,
        default=DEFAULT_WARM_POOL_SIZE,
        metavar="N",
        help="sandboxes kept set up ahead of demand for each of the two shapes"
        " (image, memory, workdir, network) requested last; 0 sets up every"
        f" sandbox on request (default: {DEFAULT_WARM_POOL_SIZE})",
    )
    serve.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="minimum level of the log lines written to stderr (default: INFO)",
    )
    serve.set_defaults(func=serve_command, daemon=True)


def _uid_base(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 2**32 - 1 - DEFAULT_UID_COUNT:
        raise argparse.ArgumentTypeError(
            f"invalid uid base {text!r}: expected an integer from 1 to"
            f" {2**32 - 1 - DEFAULT_UID_COUNT}"
        )
    return value


def _warm_pool_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_WARM_POOL_SIZE:
        raise argparse.ArgumentTypeError(
            f"invalid warm pool size {text!r}: expected an integer from 0 to"
            f" {MAX_WARM_POOL_SIZE}"
        )
    return value


def serve_command(args: argparse.Namespace) -> int:
    from engine.server.daemon import serve

    config = Config.from_data_dir(
        args.data_dir,
        uid_base=args.uid_base,
        subnet=args.subnet,
        dns_servers=tuple(args.dns),
        uplinks=tuple(args.uplink),
        block_network_by_default=args.block_network_by_default,
        expose_host=args.expose_host,
        outbound_allow=tuple(args.allow_endpoint),
        warm_pool_size=args.warm_pool,
    )
    asyncio.run(
        serve(config, socket_path=args.socket, listen=args.listen, http=args.http)
    )
    return 0
