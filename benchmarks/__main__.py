"""`python -m benchmarks`: measure the engine beside bubblewrap, runc and fork+exec.

    sudo .venv/bin/python -m benchmarks --iterations 30 --update-docs

Prints a Markdown report and writes it, with the raw samples, to
benchmarks/results/<timestamp>.json and .md. docs/benchmarks.md describes
what each row measures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import signal
import sys
from pathlib import Path

from benchmarks.harness import Options, run_benchmarks
from benchmarks.report import render_markdown, results_json, update_docs, write_results

logger = logging.getLogger("benchmarks")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _concurrency(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid client counts {text!r}: expected integers separated by"
            " commas, such as 1,4"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid client counts {text!r}: each must be 1 or more"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure cold start, exec round trip and create+terminate"
        " throughput of the engine (through a gRPC daemon and embedded) beside"
        " bubblewrap, runc and plain fork+exec, interleaved in one run. Needs"
        " root for the engine and runc rows.",
    )
    measurement = parser.add_argument_group("measurement")
    measurement.add_argument(
        "--iterations",
        type=_positive,
        default=30,
        metavar="N",
        help="samples recorded per row (default: 30)",
    )

    measurement.add_argument(
        "--warmup",
        type=_not_negative,
        default=3,
        metavar="N",
        help="rounds run and discarded before the recorded ones (default: 3)",
    )

    measurement.add_argument(
        "--throughput-cycles",
        type=_positive,
        default=5,
        metavar="N",
        help="Create+Terminate pairs per client in one throughput sample (default: 5)",
    )

    measurement.add_argument(
        "--sustained-cycles",
        type=_positive,
        default=25,
        metavar="N",
        help="Create+Terminate pairs per client in one sample of the sustained"
        " throughput row, which has no refill pause (default: 25)",
    )

    measurement.add_argument(
        "--refill",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="untimed sleep before each throughput sample, so that the daemon's"
        " warm pool fills up again (default: 2.0)",
    )

    measurement.add_argument(
        "--burst",
        type=_positive,
        default=10,
        metavar="N",
        help="execs in a row in one sample of the back-to-back exec rows (default: 10)",
    )

    measurement.add_argument(
        "--concurrency",
        type=_concurrency,
        default=(1, 4),
        metavar="N,N",
        help="client counts of the throughput rows; include 1 for the"
        " ratio column (default: 1,4)",
    )

    measurement.add_argument(
        "--pause",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="sleep after each sample, so one sample's background work, such as"
        " the warm pool's refill that starts 0.1 s after a create, does not land"
        " in the next (default: 0.25)",
    )

    measurement.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the random order of the systems in each round (default: 1)",
    )

    setup = parser.add_argument_group("setup")
    setup.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install bubblewrap or runc when they are missing",
    )

    setup.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp"),
        metavar="DIR",
        help="parent of the temporary dir for data dirs, sockets and runc"
        " bundles. Each of its parents must be searchable by others (o+x), so"
        " that sandbox uids reach the data dirs, and the path short enough"
        " for a unix socket (default: /tmp)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        metavar="DIR",
        help="where <timestamp>.json and .md are written"
        f" (default: {DEFAULT_RESULTS_DIR})",
    )

    output.add_argument(
        "--update-docs",
        action="store_true",
        help="replace the results section of --docs with this run's report",
    )

    output.add_argument(
        "--docs",
        type=Path,
        default=DEFAULT_DOCS,
        metavar="PATH",
        help=f"Markdown file that --update-docs rewrites (default: {DEFAULT_DOCS})",
    )

    output.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="minimum level of the harness's log lines on stderr (default: INFO)",
    )
    return parser


async def _main(options: Options) -> tuple[dict, list]:
    # SIGTERM cancels the run, so the cleanup steps still stop the daemon,
    # the embedded engine and the runc containers.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_benchmarks(options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logger.setLevel(args.log_level)
    if args.update_docs and not args.docs.exists():
        logger.error("--docs %s does not exist; create it first", args.docs)
        return 2
    options = Options(
        iterations=args.iterations,
        warmup=args.warmup,
        throughput_cycles=args.throughput_cycles,
        sustained_cycles=args.sustained_cycles,
        refill=args.refill,
        burst=args.burst,
        concurrency=args.concurrency,
        pause=args.pause,
        seed=args.seed,
        install=not args.no_install,
        work_dir=args.work_dir,
    )
    try:
        run, cases = asyncio.run(_main(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        logger.error("interrupted; the systems set up so far were cleaned up")
        return 130

    command = ["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)]
    run["command"] = " ".join(command)
    markdown = render_markdown(run, cases)
    stamp = datetime.datetime.fromisoformat(run["started_at"]).strftime(
        "%Y%m%dT%H%M%SZ"
    )
    json_path, markdown_path = write_results(
        args.results_dir, stamp, results_json(run, cases, markdown), markdown
    )
    print(markdown)
    logger.info("wrote %s and %s", json_path, markdown_path)
    if args.update_docs:
        update_docs(args.docs, markdown)
        logger.info("updated the results section of %s", args.docs)

    status = 0
    failed = [f"{case.measurement}, {case.label}" for case in cases if case.error]
    if failed:
        logger.error("rows that failed part way: %s", "; ".join(failed))
        status = 1
    if run["cleanup_problems"]:
        logger.error("cleanup problems: %s", "; ".join(run["cleanup_problems"]))
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
