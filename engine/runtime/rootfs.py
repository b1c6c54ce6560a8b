"""Sizes of the tmpfs mounts in a sandbox's root, /tmp and /dev/shm.

Each sandbox's supervisor, engine-init, builds the root itself
(native/root.c); the Engine sends these limits in the sandbox's spec.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TmpfsLimits:
    """Size in bytes and file count of a tmpfs; None means the kernel's default."""

    size: int | None = None
    inodes: int | None = None

    def to_message(self) -> dict[str, int | None]:
        return {"size": self.size, "inodes": self.inodes}


# tmpfs pages and inodes are charged to the sandbox's memory cgroup. The
# tmpfs mounts together stay below the memory limit, so filling them leaves
# memory for the sandbox's processes and for the engine's helpers. Otherwise
# the OOM killer would pick a helper once the sandbox's own processes are
# gone. /tmp gets half of the limit and /dev/shm an eighth, at most 64 MiB.
TMP_SHARE = 2
SHM_SHARE = 8
SHM_MAX_BYTES = 64 << 20
# One inode per 16 KiB of size. By estimate, a tmpfs inode with its dentry
# costs about 1 KiB of kernel memory.
BYTES_PER_INODE = 16 << 10
MIN_INODES = 1024


def tmpfs_limits(memory_bytes: int | None) -> tuple[TmpfsLimits, TmpfsLimits]:
    """Return the limits of /tmp and of /dev/shm for a sandbox's memory limit."""
    if memory_bytes is None:
        return TmpfsLimits(), TmpfsLimits()
    tmp = memory_bytes // TMP_SHARE
    shm = min(memory_bytes // SHM_SHARE, SHM_MAX_BYTES)
    return (
        TmpfsLimits(tmp, max(tmp // BYTES_PER_INODE, MIN_INODES)),
        TmpfsLimits(shm, max(shm // BYTES_PER_INODE, MIN_INODES)),
    )
