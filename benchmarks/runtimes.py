"""The systems the engine is compared with: bubblewrap, runc and plain fork+exec.

Each timed call returns seconds of wall time measured with
``time.perf_counter`` around the whole subprocess, from spawn to reaped exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.machine import own_cgroup_dirs

logger = logging.getLogger(__name__)

TRUE = "/bin/true"
# Seconds any single helper command may take before it counts as hung.
COMMAND_TIMEOUT = 60.0
# Seconds apt-get may take to install the comparison runtimes.
INSTALL_TIMEOUT = 600.0
# Debian package of each comparison runtime binary.
PACKAGES = {"bwrap": "bubblewrap", "runc": "runc"}
# Top-level directories that a merged-/usr host has as symlinks into /usr and
# an older layout has as real directories.
TOP_LEVEL_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


@dataclass(frozen=True)
class Tool:
    """A comparison runtime's binary: its path and version, or why it is missing."""

    name: str
    path: str | None
    version: str = ""
    reason: str = ""


def _version(path: str) -> str:
    try:
        result = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    first = result.stdout.strip().splitlines()
    return first[0] if first else "unknown"


def _apt_install(packages: list[str]) -> str:
    """Install ``packages`` with apt-get and return "" on success, else the reason."""
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-q", *packages]
    output = ""
    # A stale package index makes the first attempt fail, so refresh it and retry once.
    for attempt in ("install", "update then install"):
        if attempt != "install":
            subprocess.run(
                ["apt-get", "update", "-q"],
                env=environment,
                capture_output=True,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        logger.info("running %s", " ".join(command))
        try:
            result = subprocess.run(
                command,
                env=environment,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{' '.join(command)} failed: {error}"
        if result.returncode == 0:
            return ""
        lines = (result.stderr or result.stdout).strip().splitlines()
        output = lines[-1] if lines else f"exit status {result.returncode}"
        logger.warning("%s failed (%s): %s", " ".join(command), attempt, output)
    return f"{' '.join(command)} failed: {output}"


def find_tools(install: bool) -> dict[str, Tool]:
    """Locate bwrap and runc, installing the missing ones with apt-get when root.

    A tool that stays missing gets a ``reason`` for the table.
    """
    missing = [name for name in PACKAGES if shutil.which(name) is None]
    reason = ""
    if missing and not install:
        reason = "not installed, and --no-install was given"
    elif missing and os.geteuid() != 0:
        reason = "not installed; run as root so the harness can apt-get install it"
    elif missing and shutil.which("apt-get") is None:
        reason = "not installed, and apt-get was not found to install it"
    elif missing:
        reason = _apt_install([PACKAGES[name] for name in missing])
    tools = {}
    for name, package in PACKAGES.items():
        path = shutil.which(name)
        if path is None:
            tools[name] = Tool(name, None, reason=reason or f"{package} not found")
        else:
            tools[name] = Tool(name, path, version=_version(path))
    return tools


def host_layout() -> list[tuple[str, str | None]]:
    """List the host's top-level library dirs as (name, symlink target or None)."""
    layout = []
    for name in TOP_LEVEL_DIRS:
        path = Path("/") / name
        if path.is_symlink():
            layout.append((name, os.readlink(path)))
        elif path.is_dir():
            layout.append((name, None))
    return layout


def _show(argv: list[str], limit: int = 120) -> str:
    """Return ``argv`` as a shell command line, cut to ``limit`` characters."""
    text = shlex.join(argv)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_timed(argv: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"{_show(argv)} exited with status {result.returncode}:"
            f" {result.stderr.decode(errors='replace').strip()}"
        )
    return elapsed


def _run_captured(argv: list[str]) -> str:
    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{_show(argv)} exited with status {result.returncode}:"
            f" {result.stderr.strip()}"
        )
    return result.stdout


# Plain host processes: the baselines.


def posix_spawn_true() -> float:
    """Time os.posix_spawn of /bin/true plus os.waitpid, in seconds."""
    start = time.perf_counter()
    pid = os.posix_spawn(TRUE, [TRUE], os.environ)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{TRUE} exited with wait status {status}")
    return elapsed


# The fork+exec baseline runs in a helper interpreter that imports nothing
# else, because fork copies the page tables of the forking process. Forked
# from the harness, with the engine and gRPC loaded, the loop took a median
# of 11.5 ms, against 1.5 ms in a bare interpreter (2 cores, Linux 6.18).
# The helper times each fork, execv and waitpid itself and writes the
# seconds as one line per request line.
_FORK_EXEC_SCRIPT = """
import os, sys, time
for _ in sys.stdin:
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(sys.argv[1], [sys.argv[1]])
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    print(elapsed if os.waitstatus_to_exitcode(status) == 0 else -status, flush=True)
"""


class ForkExec:
    """A bare Python interpreter that forks and execs /bin/true on request."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FORK_EXEC_SCRIPT, TRUE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def run_true(self) -> float:
        """Return the helper's seconds for os.fork, os.execv of /bin/true, waitpid."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the fork+exec helper {self.process.pid} exited with status"
                f" {self.process.poll()}"
            )
        elapsed = float(line)
        if elapsed < 0:
            raise RuntimeError(f"{TRUE} exited with wait status {-elapsed:g}")
        return elapsed

    def close(self) -> None:
        """Close the helper's stdin, which ends it, and wait for its exit."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def subprocess_true() -> float:
    """Time subprocess.run of /bin/true with stdio on /dev/null, in seconds."""
    return _run_timed([TRUE])


def host_probe(argv: list[str]) -> str:
    """Run ``argv`` as a plain host process and return its stdout."""
    return _run_captured(argv)


# bubblewrap.


class Bubblewrap:
    """``bwrap --unshare-all`` with the host's /usr read-only: namespaces only.

    It sets no cgroup, no seccomp filter and no overlay, so its row shows what
    namespaces and a few mounts cost alone.
    """

    def __init__(self, tool: Tool) -> None:
        assert tool.path is not None
        self.tool = tool
        self.prefix = [tool.path, "--unshare-all", "--ro-bind", "/usr", "/usr"]
        for name, target in host_layout():
            if target is None:
                self.prefix += ["--ro-bind", f"/{name}", f"/{name}"]
            else:
                self.prefix += ["--symlink", target, f"/{name}"]
        self.prefix += ["--proc", "/proc", "--dev", "/dev"]

    def command(self, argv: list[str]) -> list[str]:
        return [*self.prefix, *argv]

    def run_true(self) -> float:
        return _run_timed(self.command([TRUE]))

    def probe(self, argv: list[str]) -> str:
        return _run_captured(self.command(argv))


# runc.


class Runc:
    """OCI bundles for ``runc run``, made once from ``runc spec`` in a private dir.

    Every bundle shares one read-only root: a directory with the host's /usr
    bind-mounted read-only and the host's /bin, /lib... symlinks. ``runc``
    keeps its state under the private dir (``--root``), so ``close`` can find
    and delete every container the harness made. The config keeps runc's
    defaults: PID, network, IPC, UTS and mount namespaces, no user or cgroup
    namespace, no seccomp filter, and a cgroup per container without limits.
    """

    EXEC_CONTAINER_ARGV = ["/bin/sleep", "infinity"]

    def __init__(self, tool: Tool, directory: Path) -> None:
        assert tool.path is not None
        self.tool = tool
        self.directory = directory
        self.state = directory / "state"
        self.rootfs = directory / "rootfs"
        self._counter = 0
        self.exec_container: str | None = None
        directory.mkdir(mode=0o700)
        self.state.mkdir(mode=0o700)
        self._make_rootfs()
        template = self._default_config()
        self.true_bundle = self._make_bundle("true", template, [TRUE])
        self.exec_bundle = self._make_bundle("exec", template, self.EXEC_CONTAINER_ARGV)

    def _make_rootfs(self) -> None:
        self.rootfs.mkdir(mode=0o755)
        for name in ("usr", "proc", "dev", "sys", "tmp"):
            (self.rootfs / name).mkdir(mode=0o755)
        for name, target in host_layout():
            if target is None:
                (self.rootfs / name).mkdir(mode=0o755)
            else:
                (self.rootfs / name).symlink_to(target)

    def _default_config(self) -> dict:
        scratch = self.directory / "spec"
        scratch.mkdir()
        subprocess.run(
            [self.tool.path, "spec"],
            cwd=scratch,
            check=True,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
        )
        config = json.loads((scratch / "config.json").read_text())
        shutil.rmtree(scratch)
        return config

    def _make_bundle(self, name: str, template: dict, argv: list[str]) -> Path:
        config = json.loads(json.dumps(template))
        config["root"] = {"path": str(self.rootfs), "readonly": True}
        config["process"]["terminal"] = False
        config["process"]["args"] = argv
        readonly_bind = ["rbind", "ro", "nosuid", "nodev"]
        mounts = [("usr", None), *host_layout()]
        for entry, target in mounts:
            if target is None:
                config["mounts"].append(
                    {
                        "destination": f"/{entry}",
                        "type": "bind",
                        "source": f"/{entry}",
                        "options": readonly_bind,
                    }
                )
        bundle = self.directory / f"bundle-{name}"
        bundle.mkdir(mode=0o700)
        (bundle / "config.json").write_text(json.dumps(config, indent=2))
        return bundle

    def _next_id(self) -> str:
        self._counter += 1
        return f"{self.id_prefix}{self._counter}"

    @property
    def id_prefix(self) -> str:
        return f"engine-bench-{os.getpid()}-"

    def _runc(self, *arguments: str) -> list[str]:
        assert self.tool.path is not None
        return [self.tool.path, "--root", str(self.state), *arguments]

    def delete(self, container: str) -> None:
        """Delete ``container`` if runc still has state for it."""
        if not (self.state / container).exists():
            return
        subprocess.run(
            self._runc("delete", "--force", container),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def run_true(self) -> float:
        """Time ``runc run`` of /bin/true in a new container, then delete it."""
        container = self._next_id()
        try:
            return _run_timed(
                self._runc("run", "--bundle", str(self.true_bundle), container)
            )
        finally:
            self.delete(container)

    def probe(self, argv: list[str]) -> str:
        """Run ``argv`` in a new container of the /bin/true bundle's config."""
        container = self._next_id()
        config = json.loads((self.true_bundle / "config.json").read_text())
        config["process"]["args"] = argv
        bundle = self.directory / "bundle-probe"
        bundle.mkdir(mode=0o700, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(config))
        try:
            return _run_captured(self._runc("run", "--bundle", str(bundle), container))
        finally:
            self.delete(container)

    def start_exec_container(self) -> None:
        """Start a detached container running sleep, for ``exec_true``."""
        container = self._next_id()
        # The detached container inherits runc's stdio, so a pipe here would
        # stay open for as long as the container runs.
        try:
            result = subprocess.run(
                self._runc(
                    "run", "--detach", "--bundle", str(self.exec_bundle), container
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except BaseException:
            self.delete(container)
            raise
        if result.returncode != 0:
            self.delete(container)
            raise RuntimeError(
                f"runc run --detach {container} exited with status {result.returncode}"
            )
        self.exec_container = container

    def exec_true(self) -> float:
        """Time ``runc exec`` of /bin/true in the running container."""
        assert self.exec_container is not None
        return _run_timed(self._runc("exec", self.exec_container, TRUE))

    def containers(self) -> list[str]:
        """List the containers runc has state for under this harness's --root."""
        if not self.state.exists():
            return []
        return sorted(entry.name for entry in self.state.iterdir() if entry.is_dir())

    def leftover_cgroups(self) -> list[str]:
        """Return cgroup dirs of this harness's containers that still exist.

        runc (with its cgroupfs driver and no cgroupsPath) makes each
        container's cgroup beneath the cgroup of the process that runs it,
        named after the container id.
        """
        found = []
        for parent in own_cgroup_dirs():
            with contextlib.suppress(OSError):
                found += [
                    str(Path(parent) / name)
                    for name in os.listdir(parent)
                    if name.startswith(self.id_prefix)
                ]
        return found

    def close(self) -> list[str]:
        """Delete every container and the private dir.

        Returns what could not be removed; the private dir stays when anything did.
        """
        for container in self.containers():
            logger.info("deleting runc container %s", container)
            self.delete(container)
        self.exec_container = None
        problems = [f"runc container {name}" for name in self.containers()]
        for path in self.leftover_cgroups():
            logger.warning("removing leftover runc cgroup %s", path)
            with contextlib.suppress(OSError):
                os.rmdir(path)
        problems += [f"cgroup {path}" for path in self.leftover_cgroups()]
        if not problems:
            shutil.rmtree(self.directory, ignore_errors=True)
        return problems
