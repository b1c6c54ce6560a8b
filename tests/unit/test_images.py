"""Tests of engine.storage.images and the `engine image` CLI that need no download."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from engine.cli import image as image_cli
from engine.cli.main import build_parser, parse_arguments
from engine.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from engine.storage import images as images_module
from engine.storage.images import (
    DebootstrapProgress,
    ImageStore,
    find_debian_mirror,
    shift_ownership,
)

UID_BASE = 100000
SECRET_FILES = (
    "shadow",
    "gshadow",
    "passwd",
    "group",
    "hosts",
    "hostname",
    "resolv.conf",
)
SKELETON_DIRS = (
    "usr",
    "etc",
    "tmp",
    "proc",
    "dev",
    "sys",
    "root",
    "home",
    "var",
    "var/tmp",
    "run",
    "mnt",
    "opt",
    "srv",
)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data")


@pytest.fixture
def host_root(store: ImageStore) -> Path:
    return store.resolve("host").path


def _walk(root: Path) -> list[str]:
    paths = [str(root)]
    for dirpath, dirnames, filenames in os.walk(root):
        paths.extend(os.path.join(dirpath, name) for name in (*dirnames, *filenames))
    return paths


# -- host skeleton ------------------------------------------------------------


def test_host_skeleton_dirs(host_root: Path) -> None:
    for relative in SKELETON_DIRS:
        path = host_root / relative
        assert path.is_dir(), relative
        assert not path.is_symlink(), relative
    assert stat.S_IMODE(os.stat(host_root / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(host_root / "var/tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(host_root / "root").st_mode) == 0o700
    assert list((host_root / "usr").iterdir()) == []


def test_host_skeleton_owned_by_uid_base(host_root: Path) -> None:
    assert os.stat(host_root).st_uid == UID_BASE
    wrong = [
        path for path in _walk(host_root.resolve()) if os.lstat(path).st_uid != UID_BASE
    ]
    assert wrong == []
    wrong_groups = [
        path for path in _walk(host_root.resolve()) if os.lstat(path).st_gid != UID_BASE
    ]
    assert wrong_groups == []


def test_host_skeleton_custom_uid_base(tmp_path: Path) -> None:
    root = ImageStore(tmp_path / "data", uid_base=300000).resolve("host").path
    assert os.stat(root).st_uid == 300000
    assert os.lstat(root / "etc" / "ld.so.cache").st_gid == 300000


def test_host_skeleton_lib_dirs_match_host(store: ImageStore, host_root: Path) -> None:
    binds = store.resolve("host").binds
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        copy = host_root / name
        if host.is_symlink():
            assert copy.is_symlink(), name
            assert os.readlink(copy) == os.readlink(host), name
            assert (f"/{name}", f"/{name}") not in binds
        elif host.is_dir():
            assert copy.is_dir(), name
            assert not copy.is_symlink(), name
            assert list(copy.iterdir()) == [], name
            assert (f"/{name}", f"/{name}") in binds
        else:
            assert not os.path.lexists(copy), name


def test_host_binds_include_usr(store: ImageStore) -> None:
    image = store.resolve("host")
    assert image.binds[0] == ("/usr", "/usr")
    assert image.name == "host"
    assert image.path == store.images_dir / "host"


def test_host_skeleton_has_no_secrets(host_root: Path) -> None:
    for name in SECRET_FILES:
        assert not os.path.lexists(host_root / "etc" / name), name
    assert not os.path.lexists(host_root / "etc" / "ssl" / "private")
    for relative in ("root", "home", "tmp", "var/tmp", "run"):
        assert list((host_root / relative).iterdir()) == [], relative


def test_host_skeleton_copies_runtime_files(host_root: Path) -> None:
    etc = host_root / "etc"
    assert (etc / "ld.so.cache").read_bytes() == Path("/etc/ld.so.cache").read_bytes()
    assert (etc / "ld.so.conf").read_bytes() == Path("/etc/ld.so.conf").read_bytes()
    assert sorted(os.listdir(etc / "ld.so.conf.d")) == sorted(
        os.listdir("/etc/ld.so.conf.d")
    )
    for optional in ("nsswitch.conf", "debian_version", "mime.types"):
        assert (etc / optional).exists() == Path("/etc", optional).exists(), optional
    if Path("/etc/localtime").is_symlink():
        assert os.readlink(etc / "localtime") == os.readlink("/etc/localtime")


def test_host_skeleton_alternatives_are_symlinks(host_root: Path) -> None:
    copied = host_root / "etc" / "alternatives"
    host_links = sorted(
        entry.name for entry in os.scandir("/etc/alternatives") if entry.is_symlink()
    )
    assert sorted(os.listdir(copied)) == host_links
    for name in host_links:
        assert os.readlink(copied / name) == os.readlink(
            Path("/etc/alternatives") / name
        )


def test_host_skeleton_ca_certs(host_root: Path) -> None:
    certs = host_root / "etc" / "ssl" / "certs"
    for entry in os.scandir("/etc/ssl/certs"):
        copy = certs / entry.name
        if entry.is_symlink():
            assert copy.is_symlink(), entry.name
            assert os.readlink(copy) == os.readlink(entry.path), entry.name
        elif entry.is_file(follow_symlinks=False):
            assert copy.read_bytes() == Path(entry.path).read_bytes(), entry.name


def test_host_resolve_reuses_current_skeleton(
    store: ImageStore, host_root: Path
) -> None:
    version = os.readlink(host_root)
    inode = os.stat(host_root).st_ino
    again = store.resolve("host")
    assert os.readlink(again.path) == version
    assert os.stat(again.path).st_ino == inode


def test_host_refresh_replaces_stale_version(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ImageStore(data, uid_base=UID_BASE).resolve("host")
    old_version = os.readlink(first.path)
    # A new uid_base changes the fingerprint, as a host upgrade would.
    second = ImageStore(data, uid_base=UID_BASE + 65536).resolve("host")
    new_version = os.readlink(second.path)
    assert new_version != old_version
    assert not os.path.lexists(data / "images" / old_version)
    assert os.stat(second.path).st_uid == UID_BASE + 65536
    leftovers = [name for name in os.listdir(data / "images") if ".build-" in name]
    assert leftovers == []


def test_host_refresh_replaces_missing_version(
    store: ImageStore, host_root: Path
) -> None:
    version_dir = store.images_dir / os.readlink(host_root)
    moved = store.data_dir / "moved-away"
    os.rename(version_dir, moved)
    try:
        image = store.resolve("host")
        assert image.path.is_dir()
        assert (image.path / "etc" / "ld.so.cache").is_file()
    finally:
        shutil.rmtree(moved)


# -- names, resolve, remove, list ---------------------------------------------


def test_resolve_unbuilt_debian(store: ImageStore) -> None:
    with pytest.raises(NotFound) as caught:
        store.resolve("debian")
    assert "image 'debian' not found" in str(caught.value)
    # The store is not in the default data dir, so the command must name it.
    command = f"`engine image build debian --data-dir {store.data_dir}`"
    assert command in str(caught.value)


def test_image_commands_take_data_dir() -> None:
    parser = build_parser()
    for command in ("ls", "rm", "build"):
        argv = ["image", command, "--data-dir", "/tmp/engine-x"]
        if command != "ls":
            argv.append("debian")
        args = parse_arguments(parser, argv)
        assert args.data_dir == "/tmp/engine-x"


def test_resolve_unknown_lists_images(store: ImageStore) -> None:
    (store.images_dir / "mine").mkdir(parents=True)
    with pytest.raises(NotFound) as caught:
        store.resolve("nope")
    assert "image 'nope' not found" in str(caught.value)
    assert "available images: host, mine" in str(caught.value)


@pytest.mark.parametrize(
    "name", ["", ".host", "../etc", "a/b", "Debian", "-x", "x" * 65, "a b", "host\n"]
)
def test_resolve_malformed_name(store: ImageStore, name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.resolve(name)
    assert "invalid image name" in str(caught.value)


def test_resolve_built_image(store: ImageStore) -> None:
    (store.images_dir / "mine").mkdir(parents=True)
    image = store.resolve("mine")
    assert image.path == store.images_dir / "mine"
    assert image.binds == ()


def test_remove_host_rejected(store: ImageStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.remove("host")
    assert "cannot be removed" in str(caught.value)


def test_remove_missing(store: ImageStore) -> None:
    with pytest.raises(NotFound):
        store.remove("debian")


def test_remove_built_image(store: ImageStore) -> None:
    image_dir = store.images_dir / "mine"
    (image_dir / "usr" / "bin").mkdir(parents=True)
    (image_dir / "usr" / "bin" / "tool").write_text("x")
    store.remove("mine")
    assert not image_dir.exists()
    assert [name for name in os.listdir(store.images_dir) if name != ".locks"] == []


def test_list_before_first_use(store: ImageStore) -> None:
    images = store.list()
    assert [info.name for info in images] == ["host"]
    assert images[0].kind == "host"
    assert images[0].size_bytes == 0


def test_list_host_and_built(store: ImageStore, host_root: Path) -> None:
    image_dir = store.images_dir / "mine"
    image_dir.mkdir()
    (image_dir / "data").write_bytes(b"x" * 100000)
    os.link(image_dir / "data", image_dir / "data-link")
    (store.images_dir / ".mine.build-abc").mkdir()
    images = store.list()
    assert [info.name for info in images] == ["host", "mine"]
    host, mine = images
    assert host.kind == "host"
    assert host.size_bytes > 0
    assert host.created_at > 0
    assert mine.kind == "rootfs"
    assert mine.path == image_dir
    # The hard link is counted once, so the total stays below twice the file size.
    assert 100000 <= mine.size_bytes < 2 * 100000


# -- build checks that fail before any download -------------------------------


def test_build_host_rejected(store: ImageStore) -> None:
    with pytest.raises(InvalidArgument):
        store.build("host")


def test_build_without_recipe(store: ImageStore) -> None:
    with pytest.raises(NotFound) as caught:
        store.build("alpine")
    assert "buildable images: debian" in str(caught.value)


@pytest.mark.parametrize("suite", ["Bookworm", "book worm", "", "../x"])
def test_build_malformed_suite(store: ImageStore, suite: str) -> None:
    with pytest.raises(InvalidArgument):
        store.build("debian", suite=suite)


def test_build_unknown_suite(store: ImageStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.build("debian", suite="no-such-suite")
    assert "unknown suite 'no-such-suite'" in str(caught.value)
    assert not store.images_dir.exists()


@pytest.mark.parametrize(
    "mirror", ["deb.debian.org/debian", "ftp://x/debian", "http://a b/"]
)
def test_build_malformed_mirror(store: ImageStore, mirror: str) -> None:
    with pytest.raises(InvalidArgument):
        store.build("debian", mirror=mirror)


def test_build_without_debootstrap(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(Unavailable) as caught:
        store.build("debian", mirror="http://127.0.0.1:9/debian")
    assert "apt-get install" in str(caught.value)


def test_build_as_non_root(tmp_path: Path) -> None:
    """Run build() in a child that switched to uid 65534 and report the error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = b"no error"
        try:
            os.close(read_end)
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            ImageStore(tmp_path / "data").build(
                "debian", mirror="http://127.0.0.1:9/debian"
            )
        except PermissionDenied as error:
            message = b"PermissionDenied: " + str(error).encode()
        except BaseException as error:
            message = repr(error).encode()
        finally:
            os.write(write_end, message)
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    assert message.startswith("PermissionDenied: ")
    assert "requires root" in message


# -- apt sources --------------------------------------------------------------


def _apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (apt / name).write_text(text)
    return apt


def test_mirror_from_sources_list(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        {
            "sources.list": "# deb http://commented.example/debian bookworm main\n"
            "deb-src http://src.example/debian bookworm main\n"
            "deb http://security.example/debian-security bookworm-security main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ "
            "bookworm main\n",
        },
    )
    assert find_debian_mirror(apt) == "http://mirror.example/debian"


def test_mirror_from_deb822(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        {
            "sources.list.d/a-disabled.sources": "Types: deb\nURIs: http://off.example/debian\n"
            "Suites: bookworm\nEnabled: no\n",
            "sources.list.d/b-other.sources": "Types: deb\nURIs: https://deb.other.example/node\n"
            "Suites: nodistro\n\n"
            "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n",
            "sources.list.d/c-debian.sources": "Types: deb deb-src\n"
            "# a comment\n"
            "URIs: http://one.example/debian http://two.example/debian\n"
            "Suites: bookworm bookworm-updates\nComponents: main\n",
            "sources.list.d/d.list.disabled": "deb http://ignored.example/debian "
            "bookworm main\n",
        },
    )
    assert find_debian_mirror(apt) == "http://one.example/debian"


def test_mirror_sources_list_first(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        {
            "sources.list": "deb file:///srv/mirror/debian bookworm main\n",
            "sources.list.d/a.sources": "Types: deb\nURIs: http://later.example/debian\n",
        },
    )
    assert find_debian_mirror(apt) == "file:///srv/mirror/debian"


def test_mirror_missing(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        {"sources.list.d/x.list": "deb http://example.test/ubuntu jammy main\n"},
    )
    with pytest.raises(FailedPrecondition) as caught:
        find_debian_mirror(apt)
    assert "--mirror" in str(caught.value)


def test_mirror_of_this_host() -> None:
    assert find_debian_mirror().startswith(("http://", "https://", "file://"))


# -- ownership shift ----------------------------------------------------------


def test_shift_ownership(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_text("x")
    os.chown(root / "dir" / "file", 42, 43)
    (root / "suid").write_text("x")
    os.chmod(root / "suid", 0o4755)
    os.symlink("/etc/passwd", root / "link")
    os.link(root / "dir" / "file", root / "hardlink")
    shift_ownership(root, UID_BASE, 65536)
    assert os.lstat(root).st_uid == UID_BASE
    assert os.lstat(root / "dir").st_uid == UID_BASE
    assert os.lstat(root / "dir" / "file").st_uid == UID_BASE + 42
    assert os.lstat(root / "dir" / "file").st_gid == UID_BASE + 43
    assert os.lstat(root / "hardlink").st_uid == UID_BASE + 42
    assert os.lstat(root / "link").st_uid == UID_BASE
    assert os.stat("/etc/passwd").st_uid == 0
    assert stat.S_IMODE(os.lstat(root / "suid").st_mode) == 0o4755


def test_shift_ownership_rejects_unmapped_id(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "far").write_text("x")
    os.chown(root / "far", 70000, 0)
    with pytest.raises(FailedPrecondition) as caught:
        shift_ownership(root, UID_BASE, 65536)
    assert "uid 70000" in str(caught.value)


# -- progress -----------------------------------------------------------------


def test_debootstrap_progress_counts() -> None:
    tracker = DebootstrapProgress()
    lines = [
        "I: Retrieving InRelease ",
        "I: Retrieving libc6 2.36-9",
        "I: Validating libc6 2.36-9",
        "I: Retrieving zlib1g 1:1.2.13",
        "W: some warning",
        "I: Extracting libc6...",
        "I: Unpacking libc6...",
        "I: Unpacking zlib1g:amd64...",
        "I: Configuring libc6...",
        "I: Base system installed successfully.",
        "dpkg: plain output",
    ]
    assert [tracker.step(line) for line in lines] == [
        "Retrieving InRelease",
        "Retrieving libc6",
        "Validating libc6 2.36-9",
        "Retrieving zlib1g",
        None,
        "Extracting libc6...",
        "[1/2] Unpacking libc6",
        "[2/2] Unpacking zlib1g",
        "[1/2] Configuring libc6",
        "Base system installed successfully.",
        None,
    ]


def test_progress_display_plain_lines() -> None:
    stream = io.StringIO()
    display = image_cli.ProgressDisplay(stream)
    display.show("Retrieving libc6")
    display.show("[1/2] Unpacking libc6")
    display.finish()
    assert stream.getvalue() == "Retrieving libc6\n[1/2] Unpacking libc6\n"


# -- CLI ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine")
    parser.add_argument("--data-dir")
    image_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_ls_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = _run(["--data-dir", str(tmp_path), "image", "ls", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert status == 0
    assert rows[0]["name"] == "host"
    assert rows[0]["kind"] == "host"
    assert set(rows[0]) == {"name", "kind", "size_bytes", "created_at", "path"}


def test_cli_ls_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ImageStore(tmp_path).resolve("host")
    status = _run(["--data-dir", str(tmp_path), "image", "ls"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "CREATED", "PATH"]
    assert lines[1].startswith("host")


def test_cli_rm_host_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _run(["--data-dir", str(tmp_path), "image", "rm", "host"])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.err.startswith("engine: error: ")
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err


def test_cli_build_bad_suite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _run(
        ["--data-dir", str(tmp_path), "image", "build", "debian", "--suite", "nope"]
    )
    captured = capsys.readouterr()
    assert status == 1
    assert captured.err.startswith("engine: error: unknown suite 'nope'")


def test_cli_data_dir_after_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="engine")
    parser.add_argument("--data-dir")
    image_cli.register(parser.add_subparsers(dest="command", required=True), common)
    args = parser.parse_args(["image", "ls", "--json", "--data-dir", str(tmp_path)])
    status = args.func(args)
    rows = json.loads(capsys.readouterr().out)
    assert status == 0
    assert rows[0]["path"] == str(tmp_path / "images" / "host")


def test_cli_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["image", "build", "--help"], ["image", "ls", "--help"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
    out = capsys.readouterr().out
    assert "--suite" in out
    assert "--mirror URL" in out
    assert "--json" in out


def test_build_retries_unreachable_mirror(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mirror that fails once and then responds cannot be made on demand here,
    # so this replaces the recipe run: the first call fails as debootstrap
    # does without a Release file, the second writes a minimal tree.
    found: list[list[str]] = []

    def recipe(
        unshare: str, script: Path, suite: str, build_dir: Path, *rest: object
    ) -> None:
        found.append(sorted(os.listdir(build_dir)))
        (build_dir / "partial").write_text("left by an attempt")
        if len(found) == 1:
            raise Unavailable("failed to download the Release file from mirror")
        (build_dir / "etc").mkdir()

    monkeypatch.setattr(images_module, "_run_recipe", recipe)
    monkeypatch.setattr(images_module, "DOWNLOAD_RETRY_SECONDS", (0.0, 0.0))
    progress: list[str] = []
    info = store.build("debian", progress.append, mirror="http://127.0.0.1:9/debian")
    built = store.resolve("debian").path
    assert found == [[], []]
    assert info.name == "debian"
    assert (built / "etc").is_dir()
    assert any("retrying" in line for line in progress)
    assert sorted(p.name for p in store.images_dir.iterdir()) == [".locks", "debian"]


def test_build_gives_up_after_retries(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def recipe(unshare: str, script: Path, suite: str, *rest: object) -> None:
        calls.append(suite)
        raise Unavailable("failed to download the Release file from mirror")

    monkeypatch.setattr(images_module, "_run_recipe", recipe)
    monkeypatch.setattr(images_module, "DOWNLOAD_RETRY_SECONDS", (0.0, 0.0))
    with pytest.raises(Unavailable, match="Release file"):
        store.build("debian", mirror="http://127.0.0.1:9/debian")
    assert len(calls) == 3
    assert [p.name for p in store.images_dir.iterdir()] == [".locks"]
