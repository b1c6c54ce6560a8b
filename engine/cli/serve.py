"""The `engine serve` command: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import asyncio

from engine.config import Config


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
        help="unix socket to listen on (default: engine.sock in the data dir)",
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="also listen on this TCP address, without authentication; port 0"
        " picks a free port (default: no TCP)",
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
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="minimum level of the log lines written to stderr (default: INFO)",
    )
    serve.set_defaults(func=serve_command, daemon=True)


def serve_command(args: argparse.Namespace) -> int:
    from engine.server.daemon import serve

    config = Config.from_data_dir(
        args.data_dir,
        subnet=args.subnet,
        dns_servers=tuple(args.dns),
        uplinks=tuple(args.uplink),
        block_network_by_default=args.block_network_by_default,
        expose_host=args.expose_host,
    )
    asyncio.run(serve(config, socket_path=args.socket, listen=args.listen))
    return 0
