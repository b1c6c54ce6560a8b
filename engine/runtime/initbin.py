"""engine-init, the C program of native/: building it and sealing it in memory.

``build`` compiles the C files of native/ into a static executable once per
version of the sources, in bin/ next to this module when that directory is
writable and in the given fallback directory otherwise. A static binary
needs no dynamic loader or library inside the sandbox's root, so it runs in
any image.

``sealed_memfd`` copies the executable into a memfd that host root owns, with
mode 0111 and every seal set; ``sealed_data`` does the same for other bytes
that every sandbox's setup reads, such as the seccomp program. Executing a
file the process cannot read makes the kernel mark the new process
non-dumpable and leave its memory in the host's user namespace
(``would_dump`` in fs/exec.c), and the seals keep anyone from changing the
program that every sandbox runs.

    python -m engine.runtime.initbin    # build it now, as scripts/install.sh does
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.errors import FailedPrecondition

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("native")
SOURCES = tuple(sorted(SOURCE_DIR.glob("*.c")))
HEADERS = tuple(sorted(SOURCE_DIR.glob("*.h")))
COMPILER_FLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-static")
# memfd_create flag of Linux 6.3 and later: executable memfd, as before 6.3.
MFD_EXEC = 0x0010
# ... and its opposite: the memfd can never be made executable.
MFD_NOEXEC_SEAL = 0x0008
F_SEAL_ALL = (
    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
)


def binary_name() -> str:
    """Return the executable's file name, which changes with the source."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"engine-init-{digest.hexdigest()[:12]}"


def build(fallback_dir: Path | None = None) -> Path:
    """Return the path of the compiled PID 1, compiling it if it is missing."""
    name = binary_name()
    directories = [Path(__file__).with_name("bin")]
    if fallback_dir is not None:
        directories.append(fallback_dir)
    for directory in directories:
        if (directory / name).is_file():
            return directory / name
    for directory in directories:
        try:
            directory.mkdir(mode=0o755, exist_ok=True)
            return _compile(directory / name)
        except PermissionError as error:
            log.info("cannot build %s in %s: %s", name, directory, error)
    raise FailedPrecondition(
        f"no writable directory to build the sandbox init in: {directories}"
    )


def _compile(target: Path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FailedPrecondition(
            "no C compiler found to build the sandbox init (engine/runtime/native);"
            " install gcc and libc6-dev (`sudo bash scripts/install.sh`)"
        )
    # A temporary name and a rename, so that engines starting at the same
    # time never run a half-written binary.
    descriptor, temporary = tempfile.mkstemp(prefix=".build-", dir=target.parent)
    os.close(descriptor)
    try:
        result = subprocess.run(
            [compiler, *COMPILER_FLAGS, "-o", temporary, *map(str, SOURCES)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise FailedPrecondition(
                f"building the sandbox init failed ({compiler} exited with"
                f" {result.returncode}); a static build needs libc6-dev:"
                f" {result.stderr.strip()[-2000:]}"
            )
        os.chmod(temporary, 0o755)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    log.info("built the sandbox init %s", target)
    return target


def sealed_memfd(path: Path) -> int:
    """Return a close-on-exec memfd with a sealed, execute-only copy of ``path``."""
    with open(path, "rb") as source:
        return sealed_data("engine-init", source.read(), 0o111, executable=True)


def sealed_data(name: str, data: bytes, mode: int, *, executable: bool = False) -> int:
    """Return a close-on-exec memfd named ``name`` holding ``data``, sealed."""
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        extra = MFD_EXEC if executable else MFD_NOEXEC_SEAL
        fd = os.memfd_create(name, flags | extra)
    except OSError:
        # Kernels before 6.3 know neither flag; their memfds are executable.
        fd = os.memfd_create(name, flags)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_ALL)
    except BaseException:
        os.close(fd)
        raise
    return fd


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build())
    sys.exit(0)
