"""The `engine volume ...` commands, and `--volume` for `run` and `sandbox create`."""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from engine import errors
from engine.cli.common import print_json, print_table, write_output
from engine.core.models import CloudBucketConfig
from engine.sdk.client import resolve_address
from engine.sdk.volumes import Volume, VolumeClient
from engine.storage.volumes import PathInfo, PathType, VolumeInfo

VOLUME_HELP = (
    "mount volume NAME at PATH inside the sandbox, read-only with :ro; the volume"
    " is created if it does not exist. Repeat for more volumes"
)


def add_volume_option(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable --volume NAME:PATH[:ro] option to a command."""
    parser.add_argument(
        "--volume",
        action="append",
        metavar="NAME:PATH[:ro]",
        help=VOLUME_HELP,
    )


def parse_volume_options(values: list[str] | None) -> list[Volume]:
    """Parse repeated ``--volume NAME:PATH[:ro|:rw]`` values."""
    volumes = []
    for value in values or []:
        name, separator, path = value.partition(":")
        read_only = False
        head, _, suffix = path.rpartition(":")
        if head and suffix in ("ro", "rw"):
            path = head
            read_only = suffix == "ro"
        if not name or not separator or not path:
            raise errors.InvalidArgument(
                f"invalid --volume {value!r}: expected NAME:PATH or NAME:PATH:ro,"
                " such as data:/data"
            )
        volumes.append(Volume(name, path, read_only))
    return volumes


# ------------------------------------------------------------------ parsers


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """Add `volume` to the main parser; ``common`` has the global options."""
    volume = subparsers.add_parser(
        "volume",
        parents=[common],
        help="create, list, fill and remove named volumes",
        description="Manage the daemon's volumes: directories that outlive"
        " sandboxes, mounted with `engine run --volume NAME:PATH`. Paths inside a"
        " volume are relative to its root.",
    )
    commands = volume.add_subparsers(
        dest="volume_command", metavar="COMMAND", required=True
    )

    create = commands.add_parser(
        "create",
        parents=[common],
        help="create a volume",
        description="Create volume NAME, unless it exists, and print its name.",
    )
    create.add_argument("name", metavar="NAME", help="volume name, such as data")
    create.add_argument(
        "--url",
        default="",
        help="fsspec URL of the backend: s3://BUCKET[/PREFIX], or memory://NAME for"
        " tests (default: a local directory in the data dir)",
    )
    add_s3_options(create)
    create.set_defaults(func=create_command)

    listing = commands.add_parser(
        "ls",
        parents=[common],
        help="list volumes, or the files in one",
        description="Without NAME, list every volume with its size. With NAME,"
        " list the entries of PATTERN in it: a directory (default: the root), a"
        " file, or a glob such as '*.txt' or 'logs/**'.",
    )
    listing.add_argument("name", metavar="NAME", nargs="?", help="volume name")
    listing.add_argument(
        "pattern", metavar="PATTERN", nargs="?", default="", help="path or glob"
    )
    listing.add_argument(
        "--limit",
        type=int,
        default=0,
        metavar="N",
        help="list at most N entries (default: 10000)",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=ls_command)

    remove = commands.add_parser(
        "rm",
        parents=[common],
        help="delete volumes and their files",
        description="Delete each volume NAME with every file in it. A volume that"
        " a sandbox mounts is not deleted.",
    )
    remove.add_argument("names", metavar="NAME", nargs="+", help="volume name")
    remove.set_defaults(func=rm_command)

    remove_path = commands.add_parser(
        "rm-path",
        parents=[common],
        help="delete files and directories in a volume",
        description="Delete what each PATTERN names in volume NAME: a path or a"
        " glob. Directories are deleted with their contents. Prints each path"
        " deleted.",
    )
    remove_path.add_argument("name", metavar="NAME", help="volume name")
    remove_path.add_argument(
        "patterns", metavar="PATTERN", nargs="+", help="path or glob"
    )
    remove_path.set_defaults(func=rm_path_command)

    put = commands.add_parser(
        "put",
        parents=[common],
        help="upload a file or directory into a volume",
        description="Upload LOCAL to REMOTE in volume NAME. LOCAL '-' reads stdin."
        " A REMOTE ending in '/' receives LOCAL under its own name. A directory"
        " is uploaded file by file, without its empty directories or symlinks"
        " to directories.",
    )
    put.add_argument("name", metavar="NAME", help="volume name")
    put.add_argument("local", metavar="LOCAL", help="local file or directory, or -")
    put.add_argument("remote", metavar="REMOTE", help="path in the volume")
    put.set_defaults(func=put_command)

    get = commands.add_parser(
        "get",
        parents=[common],
        help="download a file or directory from a volume",
        description="Download REMOTE from volume NAME to LOCAL. LOCAL '-' writes"
        " to stdout, and an existing local directory receives REMOTE under its"
        " own name. A directory is downloaded file by file.",
    )
    get.add_argument("name", metavar="NAME", help="volume name")
    get.add_argument("remote", metavar="REMOTE", help="path in the volume")
    get.add_argument("local", metavar="LOCAL", help="local path, or -")
    get.set_defaults(func=get_command)

    for verb, function, summary in (
        ("cp", cp_command, "copy a file or directory within a volume"),
        ("mv", mv_command, "move or rename a file or directory within a volume"),
    ):
        command = commands.add_parser(
            verb,
            parents=[common],
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}. A DST that is a"
            " directory receives SRC under its own name. Prints the new path.",
        )
        command.add_argument("name", metavar="NAME", help="volume name")
        command.add_argument("source", metavar="SRC", help="path in the volume")
        command.add_argument("destination", metavar="DST", help="path in the volume")
        command.set_defaults(func=function)

    status = commands.add_parser(
        "stat",
        parents=[common],
        help="print one entry of a volume",
        description="Print the type, mode, size and modification time of PATH in"
        " volume NAME. A symlink is reported, not followed.",
    )
    status.add_argument("name", metavar="NAME", help="volume name")
    status.add_argument("path", metavar="PATH", help="path in the volume")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=stat_command)


# ------------------------------------------------------------------ helpers


def _client(args: argparse.Namespace) -> VolumeClient:
    return VolumeClient(resolve_address(args.address, args.data_dir))


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{size}B"


def _time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _volume_row(info: VolumeInfo) -> list[str]:
    return [
        info.name,
        _size(info.size_bytes),
        str(info.file_count) if info.file_count is not None else "-",
        ",".join(info.sandbox_ids) or "-",
        _time(info.created_at),
        info.url or "local",
    ]


def _path_row(info: PathInfo) -> list[str]:
    display = "/" + info.path
    if info.type == PathType.DIRECTORY and info.path:
        display += "/"
    if info.type == PathType.SYMLINK:
        display += f" -> {info.target}"
    return [
        info.type.value,
        f"{info.mode:04o}",
        str(info.size),
        _time(info.mtime),
        display,
    ]


# ----------------------------------------------------------------- commands


def add_s3_options(parser: argparse.ArgumentParser) -> None:
    """Add the connection options of an S3 endpoint to a command."""
    parser.add_argument(
        "--endpoint",
        default="",
        help="S3 endpoint URL, such as http://127.0.0.1:9000 (default: AWS)",
    )
    parser.add_argument("--region", default="", help="S3 region, such as us-east-1")
    parser.add_argument(
        "--access-key-secret",
        default="",
        metavar="SECRET",
        help="name of the secret with the access key id (default: anonymous)",
    )
    parser.add_argument(
        "--secret-key-secret",
        default="",
        metavar="SECRET",
        help="name of the secret with the secret access key",
    )
    parser.add_argument(
        "--force-path-style",
        action="store_true",
        help="address buckets as ENDPOINT/BUCKET, as most S3-compatible servers need",
    )


def create_command(args: argparse.Namespace) -> int:
    s3 = None
    if args.endpoint or args.region or args.access_key_secret or args.secret_key_secret:
        s3 = CloudBucketConfig(
            endpoint=args.endpoint,
            region=args.region,
            access_key=args.access_key_secret,
            secret_key=args.secret_key_secret,
            force_path_style=args.force_path_style,
        )
    elif args.force_path_style:
        s3 = CloudBucketConfig(force_path_style=True)
    with _client(args) as client:
        info = client.create(args.name, url=args.url, s3=s3)
    print(info.name)
    return 0


def ls_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.name is None:
            volumes = client.list()
            if args.json:
                print_json(volumes)
            else:
                header = ["NAME", "SIZE", "FILES", "SANDBOXES", "CREATED", "BACKEND"]
                print_table([_volume_row(info) for info in volumes], header)
            return 0
        entries, truncated = client.list_path(args.name, args.pattern, limit=args.limit)
    if args.json:
        print_json(entries)
    else:
        header = ["TYPE", "MODE", "SIZE", "MODIFIED", "PATH"]
        print_table([_path_row(info) for info in entries], header)
    if truncated:
        print(
            f"engine: warning: listing cut at {len(entries)} entries; pass a larger"
            " --limit or a narrower PATTERN",
            file=sys.stderr,
        )
    return 0


def rm_command(args: argparse.Namespace) -> int:
    status = 0
    with _client(args) as client:
        for name in args.names:
            try:
                client.delete(name)
            except errors.Unavailable:
                raise
            except errors.EngineError as error:
                print(f"engine: error: {error}", file=sys.stderr)
                status = 1
                continue
            print(name)
    return status


def rm_path_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for pattern in args.patterns:
            for path in client.delete_path(args.name, pattern):
                print("/" + path)
    return 0


def put_command(args: argparse.Namespace) -> int:
    remote = args.remote
    with _client(args) as client:
        if args.local == "-":
            info = client.upload(args.name, remote, _stdin_chunks())
            print("/" + info.path)
            return 0
        local = Path(args.local)
        if remote.endswith("/") or not remote:
            remote = posixpath.join(remote, local.name)
        if not local.is_dir():
            info = client.upload_file(args.name, local, remote)
            print("/" + info.path)
            return 0
        for directory, subdirectories, files in os.walk(local):
            subdirectories.sort()
            relative = Path(directory).relative_to(local)
            for file in sorted(files):
                path = posixpath.join(remote, relative.as_posix(), file)
                info = client.upload_file(args.name, Path(directory) / file, path)
                print("/" + info.path)
    return 0


def _stdin_chunks() -> Iterator[bytes]:
    while data := sys.stdin.buffer.read(1024 * 1024):
        yield data


def get_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.local == "-":
            output = sys.stdout.buffer
            for data in client.iter_bytes(args.name, args.remote):
                output = write_output(output, data)
            return 0
        info = client.stat(args.name, args.remote)
        local = Path(args.local)
        if local.is_dir():
            local = local / (posixpath.basename(info.path) or args.name)
        if info.type != PathType.DIRECTORY:
            client.download_file(args.name, args.remote, local)
            print(local)
            return 0
        _get_directory(client, args.name, info.path, local)
    return 0


def _get_directory(client: VolumeClient, name: str, remote: str, local: Path) -> None:
    """Download every regular file below directory ``remote`` into ``local``."""
    pattern = posixpath.join(remote, "**") if remote else "**"
    entries, truncated = client.list_path(name, pattern, limit=100_000)
    if truncated:
        raise errors.ResourceExhausted(
            f"/{remote} in volume {name!r} has more than 100000 entries; download"
            " its subdirectories one by one"
        )
    local.mkdir(parents=True, exist_ok=True)
    prefix = remote + "/" if remote else ""
    for entry in entries:
        if entry.path == remote:
            continue
        target = local / entry.path.removeprefix(prefix)
        if entry.type == PathType.DIRECTORY:
            target.mkdir(parents=True, exist_ok=True)
        elif entry.type == PathType.FILE:
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(name, entry.path, target)
            print(target)


def cp_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.copy(args.name, args.source, args.destination)
    print("/" + info.path)
    return 0


def mv_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.move(args.name, args.source, args.destination)
    print("/" + info.path)
    return 0


def stat_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.stat(args.name, args.path)
    if args.json:
        print_json(info)
        return 0
    print(f"path      /{info.path}")
    print(f"type      {info.type.value}")
    print(f"size      {info.size}")
    print(f"mode      {info.mode:04o}")
    print(f"modified  {_time(info.mtime)}")
    if info.target:
        print(f"target    {info.target}")
    return 0
