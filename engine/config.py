"""Engine configuration: the data dir, the uid range and the socket path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_UID_BASE = 100000
DEFAULT_UID_COUNT = 65536


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
    # Size in bytes of the sparse file system of the sandboxes' writable
    # layers. None means 90% of the free space of the data dir's file system.
    layers_size_bytes: int | None = None

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike[str] | None = None) -> Config:
        path = Path(data_dir) if data_dir is not None else default_data_dir()
        return cls(data_dir=path.absolute())

    @property
    def sandboxes_dir(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "engine.db"

    @property
    def socket_path(self) -> Path:
        return default_socket_path(self.data_dir)
