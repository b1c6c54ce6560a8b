"""The `engine` command line: serve, run, sandbox, fs, volume, secret and image.

Every failure prints one line, "engine: error: <message>", and exits with
status 1 (2 for a usage error), never with a traceback. Ctrl-C exits with 130
and SIGTERM with 143, after `engine run` has terminated its sandbox.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from engine import errors
from engine.cli import deploy, files, sandbox, secret, serve, token, volume
from engine.cli.common import fail

logger = logging.getLogger("engine.cli")

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that `finally` blocks clean up."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--address",
        default=default,
        help="daemon address, unix:/PATH or HOST:PORT (default: $ENGINE_ADDRESS,"
        " else engine.sock in the data dir)",
    )
    parser.add_argument(
        "--data-dir",
        default=default,
        metavar="DIR",
        help="directory of the engine's state, images and sandboxes (default:"
        " /var/lib/engine for root)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine",
        description="Run code in sandboxes isolated by Linux namespaces, cgroups"
        " and seccomp.",
    )
    _global_options(parser, None)
    # Subcommands repeat the global options with SUPPRESS as the default, so
    # that they may also follow the subcommand without resetting the values
    # given before it.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)

    subparsers = parser.add_subparsers(
        dest="command_name", metavar="COMMAND", required=True
    )
    serve.register(subparsers, common)
    sandbox.register(subparsers, common)
    files.register(subparsers, common)
    volume.register(subparsers, common)
    deploy.register(subparsers, common)
    token.register(subparsers, common)
    secret.register(subparsers, common)
    try:
        from engine.cli import image
    except ModuleNotFoundError as error:
        if error.name != "engine.cli.image":
            raise
    else:
        image.register(subparsers, common)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    if getattr(args, "daemon", False):
        logging.basicConfig(
            level=args.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    else:
        logging.basicConfig(
            level=logging.WARNING,
            format="engine: %(levelname)s: %(message)s",
            stream=sys.stderr,
        )


def parse_arguments(
    parser: argparse.ArgumentParser, argv: list[str]
) -> argparse.Namespace:
    """Parse ``argv``, taking everything after the first "--" as the command.

    The command is split off before argparse runs, so that no argument after
    "--" is taken for an option or a subcommand, even one that looks like it.
    """
    if "--" not in argv:
        return parser.parse_args(argv)
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    if not hasattr(args, "command"):
        parser.error(f"unexpected arguments after --: {' '.join(argv[split + 1 :])}")
    if args.command:
        parser.error(
            f"unexpected arguments before --: {' '.join(args.command)}; put"
            " options before -- and the command after it"
        )
    args.command = argv[split + 1 :]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, sys.argv[1:] if argv is None else argv)
    _configure_logging(args)
    if not getattr(args, "daemon", False):
        # `engine serve` handles SIGTERM in its event loop. Every other command
        # unwinds, so that `engine run` terminates its sandbox on SIGTERM too.
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except errors.EngineError as error:
        return fail(str(error))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Terminated:
        return EXIT_TERMINATED
    except BrokenPipeError:
        return 1
    except OSError as error:
        return fail(str(error))


if __name__ == "__main__":
    sys.exit(main())
