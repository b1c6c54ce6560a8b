"""FUSE storage throughput: bucket mounts and volume backends, side by side.

    sudo .venv/bin/python -m benchmarks.storage_fuse [--update-docs]

It starts moto's S3 server on a free loopback port and an embedded engine in
a temporary data dir, then measures inside real sandboxes:

- sequential reads (1 MiB blocks, like ``dd bs=1M``) of one object through
  a bucket mount, against the target of 100 MB/s or more;
- writes (1 MiB blocks, then fsync and close) and cold reads of one file on
  a volume of each backend: the local directory, fsspec memory:// and fsspec
  s3:// on the same moto server.

Every figure is the median of ``--repeats`` runs. Everything it creates is
removed at the end, the moto server stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path
from typing import Any

from benchmarks.machine import describe_machine, machine_summary
from benchmarks.report import replace_section
from benchmarks.s3server import ACCESS_KEY, REGION, SECRET_KEY, MotoServer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- storage-fuse:begin -->"
END = "<!-- storage-fuse:end -->"
TARGET_MB_PER_S = 100.0
MIB = 1024 * 1024
SECTION = """
## FUSE storage

`python -m benchmarks.storage_fuse` measures the FUSE bridge of
`engine/storage/fuse.py` inside real sandboxes, against moto's S3 server on
loopback. Rows:

- **bucket mount, sequential read**: one object read from start to end with
  1 MiB `read` calls through a `CloudBucket` mount; the target is 100 MB/s.
- **volume write**: a file written with 1 MiB `write` calls, then `fsync` and
  `close`, so the time includes the upload of fsspec backends.
- **volume read**: the same file read back with 1 MiB calls after
  `posix_fadvise(DONTNEED)`, so the local backend reads from disk rather
  than the page cache where the kernel honours it.
- Backends: `local` is a directory in the data dir bind-mounted into the
  sandbox, `memory://` measures the bridge's own cost, and `s3://` adds s3fs
  and moto. moto is an S3 server written in Python, so the `s3://` rows
  measure it as much as the bridge; a real S3 endpoint differs.

"""

MEASURE = textwrap.dedent(
    """
    import os, sys, time
    mode, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    block = 1024 * 1024
    if mode == "write":
        data = os.urandom(block)
        started = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for _ in range(size // block):
            os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        print(time.perf_counter() - started)
    else:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        started = time.perf_counter()
        total = 0
        while chunk := os.read(fd, block):
            total += len(chunk)
        os.close(fd)
        elapsed = time.perf_counter() - started
        if total != size:
            sys.exit(f"read {total} bytes of {size}")
        print(elapsed)
    """
)


def _measure(sandbox: Any, mode: str, path: str, size: int) -> float:
    """Return MB/s (10**6 bytes per second) of one write or read inside ``sandbox``."""
    process = sandbox.process.exec("python3", "-c", MEASURE, mode, path, str(size))
    code = process.wait(timeout=600)
    if code != 0:
        raise RuntimeError(
            f"{mode} of {path} failed with {code}: {process.stderr.read()}"
        )
    return size / float(process.stdout.read()) / 1e6


def run(object_mib: int, volume_mib: int, repeats: int) -> dict[str, Any]:
    """Run every measurement and return the results with the machine description."""
    from engine import CloudBucket, CloudBucketConfig, Sandbox, Volume
    from engine.sdk.embedded import EmbeddedEngine
    from engine.sdk.secrets import SecretClient
    from engine.sdk.volumes import VolumeClient

    load_before = os.getloadavg()[0]
    data_dir = Path(tempfile.mkdtemp(prefix="eng-fuse-bench-", dir="/tmp"))
    data_dir.chmod(0o755)
    rows: list[dict[str, Any]] = []
    try:
        with MotoServer() as moto, EmbeddedEngine(data_dir=data_dir) as embedded:
            bucket = f"bench-{uuid.uuid4().hex[:10]}"
            client = moto.client()
            client.create_bucket(Bucket=bucket)
            with tempfile.TemporaryFile() as source:
                block = os.urandom(MIB)
                for _ in range(object_mib):
                    source.write(block)
                source.seek(0)
                client.upload_fileobj(source, bucket, "object")
            address = embedded.address
            with SecretClient(address) as secrets:
                secrets.create("BENCH_ACCESS", ACCESS_KEY)
                secrets.create("BENCH_SECRET", SECRET_KEY)
            settings = CloudBucketConfig(
                endpoint=moto.endpoint,
                region=REGION,
                access_key="BENCH_ACCESS",
                secret_key="BENCH_SECRET",
                force_path_style=True,
            )
            with VolumeClient(address) as volumes:
                volumes.create("bench-local")
                volumes.create("bench-memory", url="memory://bench")
                volumes.create("bench-s3", url=f"s3://{bucket}/volume", s3=settings)
            sandbox = Sandbox(
                address=address,
                memory=2048,
                cloud_buckets=[CloudBucket(bucket, "/bucket", config=settings)],
                volumes=[
                    Volume("bench-local", "/local"),
                    Volume("bench-memory", "/memory"),
                    Volume("bench-s3", "/s3"),
                ],
            ).create()
            try:
                samples = [
                    _measure(sandbox, "read", "/bucket/object", object_mib * MIB)
                    for _ in range(repeats)
                ]
                rows.append(
                    _row("bucket mount", "sequential read", object_mib, samples)
                )
                for backend, path in (
                    ("local", "/local"),
                    ("memory://", "/memory"),
                    ("s3://", "/s3"),
                ):
                    size = volume_mib * MIB
                    writes, reads = [], []
                    for _ in range(repeats):
                        writes.append(_measure(sandbox, "write", f"{path}/file", size))
                        reads.append(_measure(sandbox, "read", f"{path}/file", size))
                    rows.append(_row(f"volume, {backend}", "write", volume_mib, writes))
                    rows.append(_row(f"volume, {backend}", "read", volume_mib, reads))
            finally:
                sandbox.terminate()
                sandbox.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "machine": describe_machine(),
        "load_average": [load_before, os.getloadavg()[0]],
        "object_mib": object_mib,
        "volume_mib": volume_mib,
        "repeats": repeats,
        "rows": rows,
    }


def _row(mount: str, operation: str, mib: int, samples: list[float]) -> dict[str, Any]:
    return {
        "mount": mount,
        "operation": operation,
        "mib": mib,
        "samples_mb_per_s": samples,
        "median_mb_per_s": statistics.median(samples),
        "min_mb_per_s": min(samples),
        "max_mb_per_s": max(samples),
    }


def render(results: dict[str, Any]) -> str:
    """Return the results as the Markdown that goes between the markers."""
    lines = [
        f"Machine: {machine_summary(results['machine'])}. One-minute load average"
        f" {results['load_average'][0]:.1f} before the run and"
        f" {results['load_average'][1]:.1f} after it; other work on the machine"
        " lowers every figure.",
        "",
        "Command: `python -m benchmarks.storage_fuse"
        f" --object-mib {results['object_mib']} --volume-mib"
        f" {results['volume_mib']} --repeats {results['repeats']}`. Medians of"
        f" {results['repeats']} runs, in MB/s (10^6 bytes per second).",
        "",
        "| mount | operation | size | min | median | max |",
        "|---|---|---:|---:|---:|---:|",
    ]
    local: dict[str, float] = {}
    for row in results["rows"]:
        if row["mount"] == "volume, local":
            local[row["operation"]] = row["median_mb_per_s"]
    for row in results["rows"]:
        lines.append(
            f"| {row['mount']} | {row['operation']} | {row['mib']} MiB"
            f" | {row['min_mb_per_s']:.1f} | {row['median_mb_per_s']:.1f}"
            f" | {row['max_mb_per_s']:.1f} |"
        )
    lines.append("")
    read = next(row for row in results["rows"] if row["mount"] == "bucket mount")
    met = "met" if read["median_mb_per_s"] >= TARGET_MB_PER_S else "missed"
    lines.append(
        f"- sequential read from a bucket mount ≥ {TARGET_MB_PER_S:.0f} MB/s: {met}"
        f" ({read['median_mb_per_s']:.1f} MB/s)."
    )
    for row in results["rows"]:
        if row["mount"].startswith("volume,") and row["mount"] != "volume, local":
            reference = local.get(row["operation"])
            if reference:
                lines.append(
                    f"- {row['mount']} {row['operation']}:"
                    f" {row['median_mb_per_s'] / reference:.2f}x the local backend."
                )
    return "\n".join(lines) + "\n"


def update_docs(path: Path, markdown: str) -> None:
    """Replace the text between the storage-fuse markers, adding them if absent."""
    replace_section(path, BEGIN, END, markdown, SECTION + f"{BEGIN}\n{END}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.storage_fuse",
        description="Measure bucket mount and volume throughput through FUSE.",
    )
    parser.add_argument(
        "--object-mib", type=int, default=256, help="object size in MiB (default 256)"
    )
    parser.add_argument(
        "--volume-mib",
        type=int,
        default=128,
        help="size of the volume file in MiB (default 128)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per row (default 3)"
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help=f"replace the results between the markers in {DOCS.relative_to(ROOT)}",
    )
    parser.add_argument(
        "--docs", type=Path, default=DOCS, help="the Markdown file --update-docs edits"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the engine creates namespaces, cgroups and mounts")
    for name in ("object_mib", "volume_mib", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    results = run(args.object_mib, args.volume_mib, args.repeats)
    markdown = render(results)
    sys.stdout.write(markdown)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.update_docs:
        update_docs(args.docs, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
