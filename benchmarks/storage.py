"""`python -m benchmarks.storage`: transfers and small-file operations of the file API.

    sudo .venv/bin/python -m benchmarks.storage --update-docs

Measures, interleaved in one run against one `engine serve` daemon:

- a file of ``--size-mib`` MiB uploaded and downloaded through gRPC with the
  SDK, beside local copies of the same file (shutil.copyfile and cp);
- stat, list of a 100-entry directory and 4 KiB reads through the API,
  beside the same os calls on the same files through their host path;
- the cost of a sandbox's disk limit: a btrfs subvolume with a quota limit
  (what the engine does), a plain directory (no limit) and a loop-mounted
  ext4 image per sandbox (the alternative).

Prints a Markdown report. With ``--update-docs`` it replaces the text
between the storage markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.engines import Daemon
from benchmarks.machine import describe_machine, machine_summary
from benchmarks.report import percentile, replace_section
from engine import Sandbox, SandboxInstance
from engine.runtime import libc, loop
from engine.storage.layers import LayerStore

logger = logging.getLogger("benchmarks.storage")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"
STORAGE_START = "<!-- storage:begin -->"
STORAGE_END = "<!-- storage:end -->"
MIB = 1024 * 1024
SMALL_FILES = 100
SMALL_FILE_BYTES = 4096
# Size of the ext4 image of the per-sandbox alternative; sparse, so the size
# only changes how much metadata mkfs.ext4 writes.
EXT4_IMAGE_BYTES = 4096 * MIB
# The upload and the copy onto the layer file system are both in the
# sandbox's layer at once, with room to spare.
SANDBOX_DISK_MIB = 8192
# The local copies to the host's file system; the faster one's median is the
# reference of the transfer targets.
LOCAL_COPIES = ("shutil.copyfile", "cp")

DOCS_SECTION = f"""
## Storage

`python -m benchmarks.storage` measures the file API against plain local
file operations, in one run against one `engine serve` daemon, and with
`--update-docs` replaces the text between the storage markers below.

```sh
sudo .venv/bin/python -m benchmarks.storage --update-docs
```

- **Transfer**: one file of random bytes (1 GiB by default, `--size-mib`),
  read from the page cache. `upload` is `sb.fs.upload_file` to `/root` in a
  sandbox and `download` is `sb.fs.download_file` of that file, both through
  gRPC on the daemon's unix socket. The local rows copy the same file on
  the host: `shutil.copyfile` (which uses `sendfile(2)` on Linux) and `cp`
  to the data dir's file system, and `shutil.copyfile` onto the layer file
  system, where uploads land. No row calls fsync, but each starts after an
  untimed `sync`, so that no row pays for another's writeback. The targets
  compare the upload and download medians with the higher median of the
  two local copies on the host.
- **Small files**: 100 files of 4 KiB in one directory of a sandbox. `stat`
  is one `stat_file`, `list` one `list_files` of the directory (100
  entries) and `read 4 KiB` one `read_bytes`, each a gRPC call and a file
  worker in the sandbox. The os column does the same on the same files
  through their host path in the layer: `os.lstat`, `os.scandir` with an
  lstat of each entry, and open, read and close.
- **Disk limit**: the work that creating a sandbox's writable layer costs.
  `subvolume with quota limit` is what the engine does
  (`LayerStore.create`: `BTRFS_IOC_SUBVOL_CREATE` and
  `BTRFS_IOC_QGROUP_LIMIT`), `mkdir` is a plain directory without a limit,
  and `ext4 image per sandbox` is the alternative of a sparse 4 GiB image
  formatted with `mkfs.ext4`, attached to a loop device and mounted.

Targets: the upload and the download median each at least 0.5x the median
of the faster local copy (`shutil.copyfile` or `cp`), and the disk limit
adding less than 1 ms to the median create (subvolume with quota limit
against mkdir). The Targets list at the end of the results states whether
the run met each one.

Limits of these figures:

- The machine is a shared 2-core VM. The load average line shows how much
  other work ran, and the spread of the local copies (min to max) shows the
  noise it caused.
- The Python gRPC stack bounds the transfers. A stub servicer that discards
  uploads and streams one preallocated 1 MiB chunk for downloads moved
  about 900 to 1700 MiB/s up and 450 to 600 MiB/s down between two Python
  processes on this machine (a measurement outside this module). The
  engine adds the copy into the sandbox on top.
- Uploads land on the btrfs layer file system, whose buffered writes cost
  the writer about 1.1 CPU seconds per GiB against 0.3 for the host's ext4
  on this machine, as the `onto the layer file system` row shows in MiB/s.

{STORAGE_START}
{STORAGE_END}
"""


@dataclass
class Row:
    """One measured operation and its samples."""

    table: str
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "min": min(self.samples),
            "median": statistics.median(self.samples),
            "p95": percentile(self.samples, 0.95),
            "max": max(self.samples),
        }


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _write_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as file:
        remaining = size
        while remaining:
            count = min(remaining, 16 * MIB)
            file.write(os.urandom(count))
            remaining -= count


def _host_path(daemon: Daemon, sandbox: SandboxInstance, path: str) -> Path:
    """Return the host path of ``path`` in the sandbox's overlay upper dir."""
    upper = daemon.layers_dir() / sandbox.sandbox_id / "upper"
    return upper / path.lstrip("/")


class Transfers:
    """Upload, download and local copies of one file of ``size`` bytes."""

    def __init__(
        self, daemon: Daemon, sandbox: SandboxInstance, work: Path, size: int
    ) -> None:
        self.daemon = daemon
        self.sandbox = sandbox
        self.size = size
        self.source = work / "source.bin"
        self.copy = work / "copy.bin"
        self.download = work / "download.bin"
        self.layer_copy = _host_path(daemon, sandbox, "/root/layer-copy.bin")
        _write_random_file(self.source, size)
        sandbox.fs.upload_file(self.source, "/root/download.bin")
        # Read once, so that every row starts from the page cache.
        with open(self.source, "rb") as file:
            while file.read(16 * MIB):
                pass
        self.rows = {
            name: Row("transfer", name, "MiB/s")
            for name in (
                "upload",
                "download",
                "shutil.copyfile",
                "cp",
                "shutil.copyfile onto the layer file system",
            )
        }

    def _rate(self, seconds: float) -> float:
        return self.size / MIB / seconds

    def measure(self, name: str) -> None:
        row = self.rows[name]
        # Untimed: write back what earlier rows left dirty, so that no row
        # is throttled for another row's writes.
        os.sync()
        if name == "upload":
            seconds = _timed(
                lambda: self.sandbox.fs.upload_file(self.source, "/root/upload.bin")
            )
        elif name == "download":
            seconds = _timed(
                lambda: self.sandbox.fs.download_file(
                    "/root/download.bin", self.download
                )
            )
            self.download.unlink()
        elif name == "shutil.copyfile":
            seconds = _timed(lambda: shutil.copyfile(self.source, self.copy))
            self.copy.unlink()
        elif name == "cp":
            command = ["cp", str(self.source), str(self.copy)]
            seconds = _timed(lambda: subprocess.run(command, check=True))
            self.copy.unlink()
        else:
            seconds = _timed(lambda: shutil.copyfile(self.source, self.layer_copy))
            self.layer_copy.unlink()
        row.samples.append(self._rate(seconds))


class SmallFiles:
    """stat, list and 4 KiB reads through the API and through os calls."""

    def __init__(
        self, daemon: Daemon, sandbox: SandboxInstance, operations: int
    ) -> None:
        self.sandbox = sandbox
        self.operations = operations
        self.directory = "/root/small"
        sandbox.fs.create_directory(self.directory)
        payload = os.urandom(SMALL_FILE_BYTES)
        self.paths = [f"{self.directory}/file-{index:03}" for index in range(100)]
        for path in self.paths:
            sandbox.fs.write_bytes(path, payload)
        self.host_directory = _host_path(daemon, sandbox, self.directory)
        self.host_paths = [_host_path(daemon, sandbox, path) for path in self.paths]
        self.rows = {
            (operation, side): Row("small", f"{operation} ({side})", "ops/s")
            for operation in ("stat", "list", "read 4 KiB")
            for side in ("API", "os")
        }

    def measure(self, operation: str, side: str) -> None:
        count = self.operations
        if operation == "list":
            count = max(1, count // 10)
        action = self._action(operation, side)
        start = time.perf_counter()
        for index in range(count):
            action(index % SMALL_FILES)
        elapsed = time.perf_counter() - start
        self.rows[(operation, side)].samples.append(count / elapsed)

    def _action(self, operation: str, side: str) -> Callable[[int], object]:
        fs = self.sandbox.fs
        if side == "API":
            if operation == "stat":
                return lambda index: fs.stat_file(self.paths[index])
            if operation == "list":
                return lambda _: fs.list_files(self.directory)
            return lambda index: fs.read_bytes(self.paths[index])
        if operation == "stat":
            return lambda index: os.lstat(self.host_paths[index])
        if operation == "list":
            return lambda _: [
                entry.stat(follow_symlinks=False)
                for entry in os.scandir(self.host_directory)
            ]

        def read(index: int) -> bytes:
            with open(self.host_paths[index], "rb") as file:
                return file.read()

        return read


class LayerCreation:
    """Creating a sandbox's writable layer: with the quota layer and without."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir()
        self.layers = LayerStore(work, work / "layers", 16 * 1024 * MIB)
        (work / "layers").mkdir()
        self.layers.start()
        (work / "plain").mkdir()
        (work / "ext4").mkdir()
        self.counter = 0
        self.rows = {
            name: Row("layer", name, "ms")
            for name in (
                "subvolume with quota limit",
                "mkdir",
                "ext4 image per sandbox",
            )
        }

    def close(self) -> None:
        self.layers.close()

    def measure(self, name: str) -> None:
        self.counter += 1
        sandbox_id = f"sb-bench{self.counter:06}"
        if name == "subvolume with quota limit":
            seconds = _timed(lambda: self.layers.create(sandbox_id, 4096))
            self.layers.remove(sandbox_id)
        elif name == "mkdir":
            path = self.work / "plain" / sandbox_id
            seconds = _timed(lambda: path.mkdir(mode=0o700))
            path.rmdir()
        else:
            seconds = self._ext4(sandbox_id)
        self.rows[name].samples.append(seconds * 1000)

    def _ext4(self, sandbox_id: str) -> float:
        image = self.work / "ext4" / f"{sandbox_id}.img"
        target = self.work / "ext4" / sandbox_id
        target.mkdir()
        start = time.perf_counter()
        fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, EXT4_IMAGE_BYTES)
        os.close(fd)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1", str(image)],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        with loop.attach(str(image)) as device:
            libc.mount(device.path, str(target), "ext4", libc.MS_NOSUID, None)
        seconds = time.perf_counter() - start
        libc.umount2(str(target))
        image.unlink()
        target.rmdir()
        return seconds


def run(args: argparse.Namespace, work: Path) -> list[Row]:
    """Measure every row, interleaved, and return the rows.

    Sets ``args.load_average`` to the 1-minute load average at the start and
    at the end, for the report: other work on the machine shows there.
    """
    start_load = os.getloadavg()[0]
    daemon = Daemon(work / "daemon")
    daemon.start()
    layer_creation: LayerCreation | None = None
    try:
        sandbox = Sandbox(
            disk=SANDBOX_DISK_MIB, memory=1024, address=daemon.address
        ).create()
        try:
            transfers = Transfers(daemon, sandbox, work, args.size_mib * MIB)
            small = SmallFiles(daemon, sandbox, args.operations)
            layer_creation = LayerCreation(work / "layer-bench")
            jobs: list[Callable[[], None]] = []
            for name in transfers.rows:
                jobs.append(lambda name=name: transfers.measure(name))
            for operation, side in small.rows:
                jobs.append(
                    lambda operation=operation, side=side: small.measure(
                        operation, side
                    )
                )
            creation = layer_creation
            for name in creation.rows:
                jobs.append(lambda name=name: creation.measure(name))
            shuffler = random.Random(args.seed)
            for iteration in range(args.warmup + args.iterations):
                order = list(jobs)
                shuffler.shuffle(order)
                for job in order:
                    job()
                if iteration + 1 == args.warmup:
                    for row in _all_rows(transfers, small, creation):
                        row.samples.clear()
                logger.info("round %d done", iteration + 1)
            rows = _all_rows(transfers, small, creation)
            args.load_average = (start_load, os.getloadavg()[0])
        finally:
            sandbox.terminate()
            sandbox.close()
    finally:
        if layer_creation is not None:
            layer_creation.close()
        status = daemon.stop()
        if status != 0:
            logger.error(
                "engine serve exited with %s; log:\n%s", status, daemon.log_tail()
            )
    return rows


def _all_rows(
    transfers: Transfers, small: SmallFiles, creation: LayerCreation
) -> list[Row]:
    return [
        *transfers.rows.values(),
        *small.rows.values(),
        *creation.rows.values(),
    ]


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _median(rows: dict[tuple[str, str], Row], table: str, name: str) -> float:
    return rows[(table, name)].summary()["median"]


def _local_copy(by_name: dict[tuple[str, str], Row]) -> tuple[str, float]:
    """Return the local copy to the host's file system with the higher median."""
    medians = {name: _median(by_name, "transfer", name) for name in LOCAL_COPIES}
    name = max(medians, key=lambda key: medians[key])
    return name, medians[name]


def _transfer_table(rows: list[Row], size_mib: int) -> list[str]:
    by_name = {(row.table, row.name): row for row in rows}
    reference_name, reference = _local_copy(by_name)
    lines = [
        f"### Transfer of a {size_mib} MiB file (MiB/s, higher is better)",
        "",
        f"The last column divides by the median of {reference_name}, the faster"
        " local copy in this run.",
        "",
        "| operation | min | median | max | ÷ faster local copy |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.table != "transfer":
            continue
        summary = row.summary()
        lines.append(
            f"| {row.name} | {_number(summary['min'])} | {_number(summary['median'])}"
            f" | {_number(summary['max'])} | {summary['median'] / reference:.2f}x |"
        )
    return lines


def _small_table(rows: list[Row], operations: int) -> list[str]:
    by_name = {(row.table, row.name): row for row in rows}
    lines = [
        "### Small-file operations (operations/s, higher is better)",
        "",
        f"Each sample: {operations} stats or reads, or"
        f" {max(1, operations // 10)} lists, one after another.",
        "",
        "| operation | API median | os median | API ÷ os |",
        "|---|---:|---:|---:|",
    ]
    for operation in ("stat", "list", "read 4 KiB"):
        api = _median(by_name, "small", f"{operation} (API)")
        plain = _median(by_name, "small", f"{operation} (os)")
        lines.append(
            f"| {operation} | {_number(api)} | {_number(plain)} | {api / plain:.4f}x |"
        )
    return lines


def _layer_table(rows: list[Row]) -> list[str]:
    lines = [
        "### Disk limit: creating one sandbox's writable layer (ms, lower is better)",
        "",
        "| method | min | median | p95 |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        if row.table != "layer":
            continue
        summary = row.summary()
        lines.append(
            f"| {row.name} | {_number(summary['min'])} | {_number(summary['median'])}"
            f" | {_number(summary['p95'])} |"
        )
    return lines


def _targets(rows: list[Row]) -> list[str]:
    by_name = {(row.table, row.name): row for row in rows}
    reference_name, reference = _local_copy(by_name)
    lines = ["### Targets", ""]
    for name in ("upload", "download"):
        median = _median(by_name, "transfer", name)
        met = "met" if median >= 0.5 * reference else "not met"
        lines.append(
            f"- {name} median ≥ 0.5x the median of the faster local copy"
            f" ({reference_name}): {met} ({_number(median)} MiB/s against"
            f" {_number(0.5 * reference)} MiB/s)."
        )

    layer = _median(by_name, "transfer", "shutil.copyfile onto the layer file system")
    upload = _median(by_name, "transfer", "upload")
    lines.append(
        f"- (not a target) upload median ÷ the median copy onto the layer file"
        f" system, where uploads land: {upload / layer:.2f}x."
    )

    added = _median(by_name, "layer", "subvolume with quota limit")
    plain = _median(by_name, "layer", "mkdir")
    met = "met" if added - plain < 1.0 else "not met"
    lines.append(
        f"- disk limit adds < 1 ms to the median create: {met}"
        f" ({_number(added - plain)} ms over mkdir)."
    )
    return lines


def render(rows: list[Row], args: argparse.Namespace) -> str:
    """Return the Markdown report of ``rows``."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines = [
        f"Run of {now}: {args.iterations} recorded rounds after {args.warmup}"
        f" warm-up rounds, each running every row once in a shuffled order"
        f" (seed {args.seed}).",
        "",
        f"Command: `python -m benchmarks.storage --size-mib {args.size_mib}"
        f" --iterations {args.iterations} --update-docs`.",
        "",
        f"Machine: {machine_summary(describe_machine())}. 1-minute load"
        f" average {args.load_average[0]:.1f} at the start and"
        f" {args.load_average[1]:.1f} at the end (other work on the machine"
        " counts there).",
        "",
    ]
    for section in (
        _transfer_table(rows, args.size_mib),
        _small_table(rows, args.operations),
        _layer_table(rows),
        _targets(rows),
    ):
        lines += [*section, ""]
    return "\n".join(lines)


def update_docs(path: Path, markdown: str) -> None:
    """Replace the text between the storage markers of ``path``; add them if absent."""
    replace_section(path, STORAGE_START, STORAGE_END, markdown, DOCS_SECTION)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.storage",
        description="Measure upload, download and small-file operations of the"
        " file API beside local file operations, and the cost of the disk"
        " limit on sandbox creation. Needs root.",
    )
    parser.add_argument(
        "--size-mib",
        type=_positive,
        default=1024,
        metavar="MIB",
        help="size of the transferred file in MiB (default: 1024)",
    )
    parser.add_argument(
        "--iterations",
        type=_positive,
        default=5,
        metavar="N",
        help="recorded rounds; each runs every row once (default: 5)",
    )
    parser.add_argument(
        "--warmup",
        type=_not_negative,
        default=1,
        metavar="N",
        help="rounds run before recording (default: 1)",
    )
    parser.add_argument(
        "--operations",
        type=_positive,
        default=200,
        metavar="N",
        help="stats or reads per small-file sample; lists are a tenth (default: 200)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the shuffled order (default: 1)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp"),
        metavar="DIR",
        help="directory for the daemon's data dir and the test files (default: /tmp)",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="replace the storage section of --docs with the report",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=DEFAULT_DOCS,
        metavar="FILE",
        help=f"page that --update-docs rewrites (default: {DEFAULT_DOCS})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if os.geteuid() != 0:
        print("benchmarks.storage: run as root (sudo)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-storage-", dir=args.work_dir))
    # The sandboxes' mapped uids must traverse it to reach the data dir.
    work.chmod(0o755)
    try:
        rows = run(args, work)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    markdown = render(rows, args)
    print(markdown)
    if args.update_docs:
        update_docs(args.docs, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
