"""Images: the read-only lower layers of sandbox root filesystems.

An image is a directory under ``<data_dir>/images/`` that the runtime mounts as
the overlayfs ``lowerdir`` in the sandbox's user namespace. That namespace maps
uid 0 inside to ``uid_base`` on the host, so every file of an image is owned by
``uid_base + uid inside``. A file owned by host root would show up as uid 65534
inside and could not be copied up.

Two kinds exist:

``host``
    A skeleton tree built from the host with nothing downloaded: empty mount
    points, the host's /bin, /lib... symlinks, and a few non-secret files of /etc.
    The runtime bind-mounts the host's /usr (and any real /bin, /lib... directory)
    on top, as listed in ``Image.binds``. ``images/host`` is a symlink to the
    current version ``images/.host-<fingerprint>``. The fingerprint covers the
    host files that the skeleton copies, so a host upgrade gets a new version.

``rootfs``
    A tree built by a recipe under ``rootfs/`` (today only ``debian``, made with
    debootstrap), then shifted into the mapped uid range.

Entries of ``images/`` that start with a dot are internal: locks, build and
removal directories in progress, and the versions of the host skeleton.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.config import DEFAULT_UID_BASE, DEFAULT_UID_COUNT, default_data_dir
from engine.errors import (
    AlreadyExists,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

logger = logging.getLogger(__name__)

HOST_IMAGE = "host"
DEFAULT_SUITE = "bookworm"

# Image names become directory names, so they may not contain "/" or start with
# a dot (dot entries are internal).
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Debian and Ubuntu suite and codename spellings ("bookworm", "oldstable", "sid").
_SUITE_RE = re.compile(r"[a-z][a-z0-9.+-]{0,63}")
_MIRROR_SCHEMES = ("http://", "https://", "file://")

# Recipes by image name, relative to the repository's rootfs/ directory.
_RECIPE_DIR = Path(__file__).resolve().parents[2] / "rootfs"
_RECIPES = {"debian": "debian.sh"}
_DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")

# Seconds to wait for the recipe's process group after SIGTERM, then SIGKILL.
_STOP_GRACE_SECONDS = 10.0
# Seconds to wait before each new attempt when the mirror does not serve its
# Release file, which is the first thing a build downloads.
DOWNLOAD_RETRY_SECONDS = (2.0, 5.0)

# Bump when the skeleton's layout changes, so existing skeletons are rebuilt.
_HOST_FORMAT = "1"
# Empty directories of the host skeleton, with their modes.
_HOST_DIRS = {
    "usr": 0o755,
    "etc": 0o755,
    "tmp": 0o1777,
    "proc": 0o555,
    "dev": 0o755,
    "sys": 0o555,
    "root": 0o700,
    "home": 0o755,
    "var": 0o755,
    "var/tmp": 0o1777,
    "run": 0o755,
    "mnt": 0o755,
    "opt": 0o755,
    "srv": 0o755,
}
# Top-level host directories that are either a merged-/usr symlink or a real
# directory that the runtime must bind-mount.
_HOST_LIB_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Files and trees of the host's /etc that the skeleton copies. Each is public
# and needed by programs at run time. /etc/passwd, group, hosts, hostname and
# resolv.conf are absent on purpose: the runtime generates them per sandbox.
_HOST_ETC_COPIES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl/certs",
    "localtime",
    "nsswitch.conf",
    "debian_version",
    "mime.types",
)
# Only the symlinks of /etc/alternatives are copied (e.g. /usr/bin/awk points
# to /etc/alternatives/awk).
_HOST_ALTERNATIVES = "alternatives"


@dataclass(frozen=True)
class Image:
    """A resolved image, ready to mount.

    ``path`` is the overlay lowerdir. ``binds`` lists (host source, path inside
    the sandbox) pairs that the runtime bind-mounts read-only, nosuid and nodev
    on top of the overlay. Only the host image has binds.
    """

    name: str
    path: Path
    binds: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ImageInfo:
    """An image as listed: ``kind`` is "host" or "rootfs", ``size_bytes`` is
    disk usage (hard links counted once), ``created_at`` is in epoch seconds."""

    name: str
    kind: str
    size_bytes: int
    created_at: float
    path: Path


class ImageStore:
    """Images under ``<data_dir>/images``, owned by the uid range
    ``uid_base`` .. ``uid_base + uid_count - 1``."""

    def __init__(
        self,
        data_dir: Path,
        uid_base: int = DEFAULT_UID_BASE,
        uid_count: int = DEFAULT_UID_COUNT,
    ) -> None:
        if uid_base < 1:
            raise InvalidArgument(f"invalid uid_base {uid_base}; it must be at least 1")
        if uid_count < 1:
            raise InvalidArgument(
                f"invalid uid_count {uid_count}; it must be at least 1"
            )
        if uid_base + uid_count > 2**32 - 1:
            raise InvalidArgument(
                f"invalid uid range {uid_base}+{uid_count}; it must end below 2**32 - 1"
            )
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        self.uid_base = uid_base
        self.uid_count = uid_count

    # -- public API ---------------------------------------------------------

    def resolve(self, name: str) -> Image:
        """Return the image called ``name``, refreshing the host skeleton first
        if it is missing or older than the host files it copies.

        Raises InvalidArgument for a malformed name and NotFound for an image
        that was not built. Refreshing the host skeleton requires root.
        """
        _check_name(name)
        if name == HOST_IMAGE:
            return self._resolve_host()
        path = self.images_dir / name
        if not path.is_dir() or path.is_symlink():
            raise NotFound(self._not_found_message(name))
        return Image(name=name, path=path, binds=())

    def build(
        self,
        name: str = "debian",
        progress: Callable[[str], None] | None = None,
        suite: str = DEFAULT_SUITE,
        mirror: str | None = None,
    ) -> ImageInfo:
        """Build image ``name`` from its recipe and return its listing.

        The build runs in ``images/.<name>.build-*`` and is renamed into place
        only after the recipe succeeded and ownership was shifted, so a failed
        or interrupted build leaves no image and no build directory behind.
        ``progress`` receives one line of text per build step. ``mirror``
        defaults to the first Debian URL in the host's apt sources.

        Raises InvalidArgument (name, suite or mirror), NotFound (no recipe),
        AlreadyExists, PermissionDenied (not root), Unavailable (debootstrap
        missing or mirror unreachable), FailedPrecondition (a build of the same
        image is running, or no mirror was found) and InternalError (the recipe
        failed).
        """
        _check_name(name)
        if name == HOST_IMAGE:
            raise InvalidArgument(
                "image 'host' needs no build; it is made from the host on first use"
            )
        recipe_file = _RECIPES.get(name)
        if recipe_file is None:
            buildable = ", ".join(sorted(_RECIPES))
            raise NotFound(
                f"no recipe for image {name!r}; buildable images: {buildable}"
            )
        _check_suite(suite)
        if mirror is not None:
            _check_mirror(mirror)
        _require_root(f"building image {name!r}")
        # NOTE: rootfs/ sits beside the engine package and is not part of a
        # wheel, so builds work only from a source checkout.
        recipe = _RECIPE_DIR / recipe_file
        if not recipe.is_file():
            raise Unavailable(
                f"recipe {recipe} is missing; run the engine from its source tree"
            )
        unshare = _find_program("unshare", "util-linux")
        _find_program("debootstrap", "debootstrap")
        if mirror is None:
            mirror = find_debian_mirror()

        final = self.images_dir / name
        if os.path.lexists(final):
            raise AlreadyExists(_exists_message(name))
        self._make_images_dir()
        with self._lock(
            name, f"a build or removal of image {name!r} is already running"
        ):
            if os.path.lexists(final):
                raise AlreadyExists(_exists_message(name))
            self._remove_leftovers(name)
            build_dir = Path(
                tempfile.mkdtemp(prefix=f".{name}.build-", dir=self.images_dir)
            )
            logger.info(
                "building image %s (suite %s, mirror %s) in %s",
                name,
                suite,
                mirror,
                build_dir,
            )
            try:
                os.chmod(build_dir, 0o755)
                for attempt, delay in enumerate((*DOWNLOAD_RETRY_SECONDS, None), 1):
                    try:
                        _run_recipe(unshare, recipe, suite, build_dir, mirror, progress)
                        break
                    except Unavailable as error:
                        # The mirror did not serve the Release file, the
                        # recipe's first download, so nothing was unpacked yet.
                        if delay is None:
                            raise
                        logger.warning(
                            "image %s, attempt %d: %s; trying again in %.0f s",
                            name,
                            attempt,
                            error,
                            delay,
                        )
                        if progress is not None:
                            progress(
                                f"Mirror did not answer; retrying in {delay:.0f} s"
                            )
                        _discard_tree(build_dir)
                        build_dir.mkdir(mode=0o755)
                        time.sleep(delay)
                if progress is not None:
                    last_uid = self.uid_base + self.uid_count - 1
                    progress(f"Shifting ownership into uids {self.uid_base}-{last_uid}")
                shift_ownership(build_dir, self.uid_base, self.uid_count)
                os.utime(build_dir)
                os.rename(build_dir, final)
            except BaseException:
                _discard_tree(build_dir)
                raise
        logger.info("built image %s at %s", name, final)
        return self._info(name, "rootfs", final)

    def list(self) -> list[ImageInfo]:
        """Return every image, host first, then the built images by name.

        The host image is always listed. Before its first use it has size 0,
        created_at 0.0 and a path that does not exist yet.
        """
        images = [self._host_info()]
        try:
            entries = sorted(os.scandir(self.images_dir), key=lambda entry: entry.name)
        except FileNotFoundError:
            return images
        for entry in entries:
            if entry.name.startswith(".") or entry.name == HOST_IMAGE:
                continue
            if not _NAME_RE.fullmatch(entry.name) or not entry.is_dir(
                follow_symlinks=False
            ):
                continue
            images.append(self._info(entry.name, "rootfs", Path(entry.path)))
        return images

    def remove(self, name: str) -> None:
        """Delete the built image ``name``.

        Raises InvalidArgument for "host" or a malformed name, NotFound if the
        image does not exist, and FailedPrecondition while it is being built.
        Sandboxes still running on the image see its files disappear.
        """
        _check_name(name)
        if name == HOST_IMAGE:
            raise InvalidArgument("image 'host' is built in and cannot be removed")
        path = self.images_dir / name
        if not path.is_dir() or path.is_symlink():
            raise NotFound(self._not_found_message(name))
        with self._lock(
            name, f"a build or removal of image {name!r} is already running"
        ):
            if not path.is_dir():
                raise NotFound(self._not_found_message(name))
            # Rename first so the image disappears at once, even if deleting
            # its files takes a while or fails halfway.
            doomed = Path(
                tempfile.mkdtemp(prefix=f".{name}.remove-", dir=self.images_dir)
            )
            try:
                os.rename(path, doomed / name)
            except OSError:
                doomed.rmdir()
                raise
            _remove_tree(doomed)
        logger.info("removed image %s", name)

    # -- host skeleton ------------------------------------------------------

    def _resolve_host(self) -> Image:
        layout = _host_layout()
        version = f".host-{self._host_fingerprint(layout)}"
        link = self.images_dir / HOST_IMAGE
        if not self._host_is_current(link, version):
            self._refresh_host(layout, version)
        binds = [("/usr", "/usr")]
        binds.extend(
            (f"/{name}", f"/{name}") for name, target in layout if target is None
        )
        return Image(name=HOST_IMAGE, path=link, binds=tuple(binds))

    def _host_fingerprint(self, layout: list[tuple[str, str | None]]) -> str:
        """Hash what the skeleton is made of: its format, uid_base, the host's
        top-level layout and the stat data of each copied /etc entry.

        NOTE: a copied file rewritten in place (same inode, same directory)
        with an unchanged mtime and size goes unnoticed. ldconfig,
        update-alternatives and update-ca-certificates all replace files by
        rename, which changes the inode and the directory's mtime.
        """
        digest = hashlib.sha256()
        digest.update(f"format={_HOST_FORMAT} uid_base={self.uid_base}\n".encode())
        for name, target in layout:
            digest.update(f"{name} -> {target}\n".encode())
        etc = Path("/etc")
        for relative in (*_HOST_ETC_COPIES, _HOST_ALTERNATIVES):
            source = etc / relative
            digest.update(f"{relative}: {_stat_signature(source)}\n".encode())
            if source.is_dir() and not source.is_symlink():
                for dirpath, _dirnames, _filenames in os.walk(source):
                    digest.update(
                        f"{dirpath}: {_stat_signature(Path(dirpath))}\n".encode()
                    )
        return digest.hexdigest()[:24]

    def _host_is_current(self, link: Path, version: str) -> bool:
        try:
            return os.readlink(link) == version and (self.images_dir / version).is_dir()
        except OSError:
            return False

    def _refresh_host(self, layout: list[tuple[str, str | None]], version: str) -> None:
        """Build skeleton ``version`` and point ``images/host`` at it.

        The symlink is swapped with rename(2), so a concurrent resolve sees
        either the old or the new skeleton, never a partial one.
        NOTE: older versions are deleted right away, so a sandbox started on one
        loses the files it has not yet looked up.
        """
        _require_root("creating the host image skeleton")
        self._make_images_dir()
        link = self.images_dir / HOST_IMAGE
        with self._lock(HOST_IMAGE, None):
            if self._host_is_current(link, version):
                return
            self._remove_leftovers(HOST_IMAGE)
            build_dir = Path(
                tempfile.mkdtemp(prefix=".host.build-", dir=self.images_dir)
            )
            try:
                _populate_host_skeleton(build_dir, layout)
                shift_ownership(build_dir, self.uid_base, self.uid_count)
                os.utime(build_dir)
                target = self.images_dir / version
                if os.path.lexists(target):
                    _remove_tree(target)
                os.rename(build_dir, target)
            except BaseException:
                _discard_tree(build_dir)
                raise
            if link.is_dir() and not link.is_symlink():
                _remove_tree(link)
            new_link = self.images_dir / f".host.link-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                new_link.unlink()
            os.symlink(version, new_link)
            os.replace(new_link, link)
            for entry in os.scandir(self.images_dir):
                if entry.name.startswith(".host-") and entry.name != version:
                    _discard_tree(Path(entry.path))
        logger.info("host image skeleton refreshed: %s -> %s", link, version)

    def _host_info(self) -> ImageInfo:
        link = self.images_dir / HOST_IMAGE
        try:
            created_at = link.stat().st_mtime
        except OSError:
            return ImageInfo(
                name=HOST_IMAGE, kind="host", size_bytes=0, created_at=0.0, path=link
            )
        return ImageInfo(
            name=HOST_IMAGE,
            kind="host",
            size_bytes=_disk_usage(link.resolve()),
            created_at=created_at,
            path=link,
        )

    # -- helpers ------------------------------------------------------------

    def _info(self, name: str, kind: str, path: Path) -> ImageInfo:
        return ImageInfo(
            name=name,
            kind=kind,
            size_bytes=_disk_usage(path),
            created_at=path.stat().st_mtime,
            path=path,
        )

    def _not_found_message(self, name: str) -> str:
        if name in _RECIPES:
            command = f"engine image build {name}"
            if self.data_dir != default_data_dir():
                command += f" --data-dir {self.data_dir}"
            return (
                f"image {name!r} not found in {self.images_dir}; build it with"
                f" `{command}`"
            )
        names = [HOST_IMAGE]
        with contextlib.suppress(FileNotFoundError):
            names += sorted(
                entry.name
                for entry in os.scandir(self.images_dir)
                if entry.name != HOST_IMAGE
                and _NAME_RE.fullmatch(entry.name)
                and entry.is_dir(follow_symlinks=False)
            )
        return f"image {name!r} not found; available images: {', '.join(names)}"

    def _make_images_dir(self) -> None:
        # The runtime resolves lowerdir paths inside a user namespace, where
        # host root's files count as "other", so images/ must be searchable by all.
        # NOTE: data_dir and its parents need the same search permission.
        self.images_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.images_dir, 0o755)

    @contextlib.contextmanager
    def _lock(self, name: str, busy_message: str | None) -> Iterator[None]:
        """Hold an exclusive flock on ``images/.locks/<name>``.

        With ``busy_message`` the lock is tried once and FailedPrecondition with
        that message is raised if another process holds it; without, it waits.
        """
        locks = self.images_dir / ".locks"
        locks.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(locks / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if busy_message is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise FailedPrecondition(busy_message) from None
            yield
        finally:
            os.close(fd)

    def _remove_leftovers(self, name: str) -> None:
        """Delete build and removal directories of ``name`` left by a process
        that was killed. The caller holds the lock of ``name``, so no live
        process owns them."""
        for entry in os.scandir(self.images_dir):
            if entry.name.startswith((f".{name}.build-", f".{name}.remove-")):
                logger.warning(
                    "removing %s, left behind by an earlier build or removal",
                    entry.path,
                )
                _remove_tree(Path(entry.path))


# -- validation ---------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid image name {name!r}; use 1-64 characters of a-z, 0-9, '.', '_' "
            "and '-', starting with a letter or digit"
        )


def _exists_message(name: str) -> str:
    return (
        f"image {name!r} already exists; remove it with `engine image rm {name}` first"
    )


def _check_suite(suite: str) -> None:
    if not _SUITE_RE.fullmatch(suite):
        raise InvalidArgument(
            f"invalid suite name {suite!r}; use a Debian codename such as 'bookworm'"
        )
    if _DEBOOTSTRAP_SCRIPTS.is_dir() and not (_DEBOOTSTRAP_SCRIPTS / suite).exists():
        raise InvalidArgument(
            f"unknown suite {suite!r}: debootstrap has no script for it in "
            f"{_DEBOOTSTRAP_SCRIPTS}; use a Debian codename such as 'bookworm'"
        )


def _check_mirror(mirror: str) -> None:
    if not mirror.startswith(_MIRROR_SCHEMES) or any(char.isspace() for char in mirror):
        raise InvalidArgument(
            f"invalid mirror {mirror!r}; use an http://, https:// or file:// URL "
            "such as the deb URL in /etc/apt/sources.list"
        )


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise PermissionDenied(
            f"{action} requires root, because image files are owned by the sandbox "
            "uid range; run the command as root"
        )


def _find_program(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise Unavailable(
            f"{program} not found in PATH ({os.environ.get('PATH', os.defpath)}); "
            f"install it with `apt-get install {package}`"
        )
    return path


# -- apt sources --------------------------------------------------------------


def find_debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """Return the first Debian archive URL in the apt sources under ``apt_dir``.

    apt's own order is followed: sources.list, then sources.list.d/*.list and
    *.sources sorted by file name. A URL counts when it belongs to a ``deb``
    (not ``deb-src``) entry and its path ends in ``/debian``, which excludes
    debian-security and third-party repositories. Raises FailedPrecondition if
    none is found.
    """
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files.extend(
            sorted(
                path for path in parts.iterdir() if path.suffix in (".list", ".sources")
            )
        )
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except (FileNotFoundError, IsADirectoryError):
            continue
        urls = _deb822_urls(text) if path.suffix == ".sources" else _one_line_urls(text)
        for url in urls:
            if url.startswith(_MIRROR_SCHEMES) and url.rstrip("/").endswith("/debian"):
                return url.rstrip("/")
    raise FailedPrecondition(
        f"no Debian mirror found in the apt sources under {apt_dir}; "
        "pass one with --mirror, e.g. --mirror http://<your mirror>/debian"
    )


def _one_line_urls(text: str) -> Iterator[str]:
    """Yield the URL of each ``deb`` line, as in ``deb [opts] URL suite comps``."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        words = line.split()
        if not words or words[0] != "deb":
            continue
        rest = words[1:]
        if rest and rest[0].startswith("["):
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if rest:
            yield rest[0]


def _deb822_urls(text: str) -> Iterator[str]:
    """Yield the URIs of each enabled stanza with type ``deb`` in a
    deb822 ``.sources`` file."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0].isspace() and key is not None:
                fields[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        yield from fields.get("uris", "").split()


# -- the recipe ---------------------------------------------------------------


class DebootstrapProgress:
    """Turns debootstrap's output into one progress line per step.

    Only lines starting with "I: " are steps. Unpacking and configuring lines
    get a "[n/total] " prefix, where total is the number of packages that were
    retrieved. debootstrap installs a few core packages without such lines, so
    the count can end slightly below total.
    """

    _COUNTED = ("Unpacking", "Configuring")

    def __init__(self) -> None:
        self.retrieved: set[str] = set()
        self.seen: dict[str, set[str]] = {verb: set() for verb in self._COUNTED}

    def step(self, line: str) -> str | None:
        """Return the progress text for one output line, or None if it is no step."""
        if not line.startswith("I: "):
            return None
        text = line[3:].strip()
        verb, _, rest = text.partition(" ")
        words = rest.split()
        # "Retrieving libc6 2.36-9" names a package; "Retrieving InRelease" does not.
        if verb == "Retrieving" and len(words) == 2:
            self.retrieved.add(words[0])
            return f"Retrieving {words[0]}"
        if verb in self._COUNTED and len(words) == 1 and words[0].endswith("..."):
            package = words[0].removesuffix("...").split(":", 1)[0]
            seen = self.seen[verb]
            seen.add(package)
            if self.retrieved and len(seen) <= len(self.retrieved):
                return f"[{len(seen)}/{len(self.retrieved)}] {verb} {package}"
            return f"{verb} {package}"
        return text


def _run_recipe(
    unshare: str,
    recipe: Path,
    suite: str,
    target: Path,
    mirror: str,
    progress: Callable[[str], None] | None,
) -> None:
    """Run the recipe in a private mount namespace and wait for it.

    debootstrap mounts /proc and /sys inside the target. In a private mount
    namespace those mounts never reach the host's mount table and vanish with
    the process, even if it is killed. The recipe runs in its own session, so a
    Ctrl-C reaches only this process, which then stops the recipe's whole
    process group before re-raising.
    """
    command = [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        str(recipe),
    ]
    command += [suite, str(target), mirror]
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "DEBIAN_FRONTEND": "noninteractive",
        "HOME": "/root",
    }
    for key in (
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    tracker = DebootstrapProgress()
    tail: collections.deque[str] = collections.deque(maxlen=20)
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        text=True,
        errors="replace",
    )
    assert process.stdout is not None
    try:
        for raw in process.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            logger.debug("%s: %s", recipe.name, line)
            if line.startswith("W: "):
                logger.warning("%s: %s", recipe.name, line)
            text = tracker.step(line)
            if text is not None and progress is not None:
                progress(text)
        status = process.wait()
    except BaseException:
        _stop_process_group(process)
        raise
    finally:
        process.stdout.close()
    if status != 0:
        raise _recipe_error(recipe, status, list(tail), mirror)


def _recipe_error(recipe: Path, status: int, tail: list[str], mirror: str) -> Exception:
    errors = [line for line in tail if line.startswith("E: ")]
    if errors:
        detail = errors[-1]
    elif tail:
        detail = tail[-1]
    else:
        detail = "no output"
    # The exception carries the last error line, and the log the context.
    logger.info(
        "%s failed with exit status %d; last output:\n%s",
        recipe.name,
        status,
        "\n".join(tail),
    )
    if (
        "Failed getting release file" in detail
        or "Failed getting release signature" in detail
    ):
        return Unavailable(
            f"failed to download the Release file from mirror {mirror} ({detail}); "
            "check the network or pass another mirror with --mirror"
        )
    return InternalError(f"{recipe.name} failed with exit status {status}: {detail}")


def _stop_process_group(process: subprocess.Popen[str]) -> None:
    """Send SIGTERM, then SIGKILL, to the recipe's process group and wait
    until no member is left."""
    pgid = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        logger.warning("recipe process group %d ignored SIGTERM; sending SIGKILL", pgid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + _STOP_GRACE_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    logger.error("recipe process group %d still has members after SIGKILL", pgid)


# -- trees --------------------------------------------------------------------


def shift_ownership(root: Path, uid_base: int, uid_count: int) -> None:
    """Add ``uid_base`` to the uid and gid of every file under ``root``.

    Symlinks are changed themselves (lchown) and never followed, and a file
    with several hard links is changed once. A file whose uid or gid is
    ``uid_count`` or more has no place in the mapped range, so
    FailedPrecondition is raised when it is reached. Setuid and setgid bits are
    kept: chown(2) clears them, so they are set again. They have no effect in a
    sandbox because the runtime mounts the image nosuid. chown(2) also removes
    file capabilities (the security.capability xattr), and those are not
    restored.
    """
    root_device = os.lstat(root).st_dev
    shifted: set[int] = set()
    _shift_one(str(root), root_device, uid_base, uid_count, shifted)
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        for name in (*dirnames, *filenames):
            _shift_one(
                os.path.join(dirpath, name), root_device, uid_base, uid_count, shifted
            )


def _shift_one(
    path: str, root_device: int, uid_base: int, uid_count: int, shifted: set[int]
) -> None:
    info = os.lstat(path)
    if info.st_dev != root_device:
        raise InternalError(
            f"{path} is on another filesystem than the image; "
            "unmount it and build again"
        )
    if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
        if info.st_ino in shifted:
            return
        shifted.add(info.st_ino)
    if info.st_uid >= uid_count or info.st_gid >= uid_count:
        raise FailedPrecondition(
            f"{path} has uid {info.st_uid} and gid {info.st_gid}, outside the mapped "
            f"range 0-{uid_count - 1}; raise uid_count or fix the image"
        )
    os.lchown(path, info.st_uid + uid_base, info.st_gid + uid_base)
    if not stat.S_ISLNK(info.st_mode) and info.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(info.st_mode))


def _raise(error: OSError) -> None:
    raise error


def _disk_usage(root: Path) -> int:
    """Return the bytes allocated under ``root``, counting hard links once."""
    seen: set[tuple[int, int]] = set()
    total = _allocated(str(root), seen)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            total += _allocated(os.path.join(dirpath, name), seen)
    return total


def _allocated(path: str, seen: set[tuple[int, int]]) -> int:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    key = (info.st_dev, info.st_ino)
    if key in seen:
        return 0
    seen.add(key)
    return info.st_blocks * 512


def _mount_points_under(root: Path) -> list[str]:
    """Return the mount points at or below ``root`` in this mount namespace."""
    prefix = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with space, tab, newline and backslash
            # written as octal escapes.
            point = line.split()[4]
            point = re.sub(
                r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), point
            )
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _remove_tree(root: Path) -> None:
    """Delete ``root`` recursively. Raise InternalError instead if anything
    below it is mounted, so that a leftover bind mount never leads into host
    files."""
    mounts = _mount_points_under(root)
    if mounts:
        raise InternalError(
            f"cannot delete {root}, because {', '.join(mounts)} is mounted below it; "
            "unmount it and retry"
        )
    shutil.rmtree(root)


def _discard_tree(root: Path) -> None:
    """Delete a build directory after a failure, logging instead of raising so
    that the original error is the one the caller sees."""
    try:
        _remove_tree(root)
    except FileNotFoundError:
        pass
    except (OSError, InternalError) as error:
        logger.error("could not delete %s: %s", root, error)


def _stat_signature(path: Path) -> str:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(info.st_mode):
        return f"symlink {os.readlink(path)}"
    return (
        f"{stat.filemode(info.st_mode)} {info.st_ino} {info.st_size} {info.st_mtime_ns}"
    )


def _host_layout() -> list[tuple[str, str | None]]:
    """Return (name, symlink target) for each of /bin, /sbin, /lib... that
    exists on the host, with target None for a real directory."""
    layout: list[tuple[str, str | None]] = []
    for name in _HOST_LIB_DIRS:
        path = Path("/") / name
        if path.is_symlink():
            layout.append((name, os.readlink(path)))
        elif path.is_dir():
            layout.append((name, None))
    return layout


def _populate_host_skeleton(root: Path, layout: list[tuple[str, str | None]]) -> None:
    os.chmod(root, 0o755)
    for relative, mode in _HOST_DIRS.items():
        path = root / relative
        path.mkdir()
        os.chmod(path, mode)
    for name, target in layout:
        if target is None:
            (root / name).mkdir(mode=0o755)
        else:
            os.symlink(target, root / name)
    etc = root / "etc"
    (etc / "ssl").mkdir(mode=0o755)
    for relative in _HOST_ETC_COPIES:
        source = Path("/etc") / relative
        if os.path.lexists(source):
            _copy_public(source, etc / relative)
    alternatives = etc / _HOST_ALTERNATIVES
    alternatives.mkdir(mode=0o755)
    source_dir = Path("/etc") / _HOST_ALTERNATIVES
    if source_dir.is_dir():
        for entry in sorted(os.scandir(source_dir), key=lambda entry: entry.name):
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), alternatives / entry.name)


def _copy_public(source: Path, destination: Path) -> None:
    """Copy ``source`` to ``destination``, keeping symlinks as symlinks.

    Regular files and directories that are not readable by every user are
    skipped, as are device nodes, FIFOs and sockets. A skipped file is logged.
    """
    info = os.lstat(source)
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), destination)
    elif stat.S_ISDIR(info.st_mode):
        if info.st_mode & (stat.S_IROTH | stat.S_IXOTH) != (
            stat.S_IROTH | stat.S_IXOTH
        ):
            logger.warning(
                "host image: skipping %s, which not every user can read", source
            )
            return
        destination.mkdir()
        os.chmod(destination, stat.S_IMODE(info.st_mode))
        for name in sorted(os.listdir(source)):
            _copy_public(source / name, destination / name)
    elif stat.S_ISREG(info.st_mode):
        if not info.st_mode & stat.S_IROTH:
            logger.warning(
                "host image: skipping %s, which not every user can read", source
            )
            return
        shutil.copy2(source, destination, follow_symlinks=False)
    else:
        logger.warning(
            "host image: skipping %s, which is not a file, directory or symlink", source
        )
