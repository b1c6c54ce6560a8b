"""Removal of directory trees that sandbox code may have shaped."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def remove_tree(path: str | os.PathLike[str]) -> bool:
    """Remove ``path`` and everything below it; return False if something is left.

    shutil.rmtree recurses once per level and raises RecursionError on a tree
    a few thousand directories deep, which sandbox code can build in a
    second. GNU rm walks iteratively at any depth, and --one-file-system
    keeps it from descending into anything mounted below ``path``.
    """
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        return True
    result = subprocess.run(
        ["rm", "-rf", "--one-file-system", "--", str(target)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    if result.returncode != 0:
        log.error(
            "removing %s failed: %s",
            target,
            result.stderr.decode(errors="replace")[:500],
        )
        return False
    return True
