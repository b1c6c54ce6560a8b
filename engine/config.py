"""Engine configuration: the data dir, the uid range, the socket path and networking."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_UID_BASE = 100000
DEFAULT_UID_COUNT = 65536
# Warm sandboxes per shape (engine.core.warm), and the largest setting the
# CLI accepts.
DEFAULT_WARM_POOL_SIZE = 4
MAX_WARM_POOL_SIZE = 256
# Files in which shadow-utils grants users ranges of ids for their own user
# namespaces (see subuid(5)); a user granted ids inside the engine's range
# could enter a namespace mapped onto sandbox files and processes.
SUBORDINATE_ID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


def default_data_dir() -> Path:
    """Return /var/lib/engine for root, else the XDG data dir's engine folder."""
    if os.geteuid() == 0:
        return Path("/var/lib/engine")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "engine"


def default_socket_path(data_dir: Path | None = None) -> Path:
    """Return the daemon's default unix socket path inside the data dir."""
    return (data_dir or default_data_dir()) / "engine.sock"


@dataclass(frozen=True)
class Config:
    """Settings of one Engine instance.

    Sandbox uid 0 maps to host uid ``uid_base``, and ``uid_count`` ids are
    mapped in all, so no sandbox process is ever root on the host.
    """

    data_dir: Path
    uid_base: int = DEFAULT_UID_BASE
    uid_count: int = DEFAULT_UID_COUNT
    subordinate_id_files: tuple[Path, ...] = SUBORDINATE_ID_FILES
    # The sandboxes' IPv4 subnet; None picks a /16 in 10.0.0.0/8 that no host
    # route or address overlaps.
    subnet: str | None = None
    # Name servers written to every networked sandbox's /etc/resolv.conf.
    dns_servers: tuple[str, ...] = ()
    # Host interfaces that sandbox egress may leave through; "auto" means
    # those of the host's IPv4 default routes. An empty tuple means
    # sandbox traffic never leaves the host.
    uplinks: tuple[str, ...] = ()
    # Policy of sandboxes that pass neither block_network nor allow_list.
    block_network_by_default: bool = False
    # Address that exposed ports listen on.
    expose_host: str = "127.0.0.1"
    # CIDRs beyond public addresses that token holders may name as bucket
    # endpoints and callback URLs; see engine.core.outbound.
    outbound_allow: tuple[str, ...] = ()
    # Size in bytes of the sparse file system of the sandboxes' writable
    # layers. None means 90% of the free space of the data dir's file system.
    layers_size_bytes: int | None = None
    # Sandboxes kept set up ahead of demand for each recently requested
    # shape (engine.core.warm); 0 sets up every sandbox on request.
    warm_pool_size: int = DEFAULT_WARM_POOL_SIZE

    @classmethod
    def from_data_dir(
        cls, data_dir: str | os.PathLike[str] | None = None, **settings: Any
    ) -> Config:
        path = Path(data_dir) if data_dir is not None else default_data_dir()
        return cls(data_dir=path.absolute(), **settings)

    @property
    def sandboxes_dir(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "engine.db"

    @property
    def socket_path(self) -> Path:
        return default_socket_path(self.data_dir)


@dataclass(frozen=True)
class SubordinateRange:
    """One line of /etc/subuid or /etc/subgid: ``owner`` may map ``count`` ids."""

    path: Path
    owner: str
    start: int
    count: int

    def __str__(self) -> str:
        return f"{self.path}: {self.owner}:{self.start}:{self.count}"


def read_subordinate_ranges(paths: tuple[Path, ...]) -> list[SubordinateRange]:
    """Parse the ``owner:start:count`` lines of ``paths``; missing files are empty."""
    ranges = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            fields = line.strip().split(":")
            if len(fields) != 3 or line.lstrip().startswith("#"):
                continue
            owner, start, count = fields
            if start.isdigit() and count.isdigit():
                ranges.append(SubordinateRange(path, owner, int(start), int(count)))
    return ranges


def overlapping_ranges(
    uid_base: int, uid_count: int, ranges: list[SubordinateRange]
) -> list[SubordinateRange]:
    """Return the ranges that share an id with ``uid_count`` ids from ``uid_base``."""
    end = uid_base + uid_count
    return [r for r in ranges if r.start < end and uid_base < r.start + r.count]


def free_uid_base(uid_count: int, ranges: list[SubordinateRange]) -> int:
    """Return the lowest multiple of 65536, from 2**20 up, that no range overlaps."""
    step = 65536
    base = 1 << 20
    while overlapping_ranges(base, uid_count, ranges):
        base += step
    return base
