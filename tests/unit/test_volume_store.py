"""VolumeStore on a real directory: layout, paths, globs and symlink containment.

The symlinks that sandbox code could leave in a volume are created here
directly in the volume's host directory. The integration tests create them
from inside a sandbox.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from engine.storage.volumes import (
    PathType,
    VolumeStore,
    check_name,
    glob_match,
    split_path,
)

UID = 100000


@pytest.fixture
def store(tmp_path: Path) -> VolumeStore:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    volumes = VolumeStore(data_dir, UID)
    volumes.prepare()
    return volumes


@pytest.fixture
def root(store: VolumeStore) -> Path:
    """The host directory of volume "vol"."""
    store.create("vol")
    return store.data_path("vol")


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A host directory outside every volume, with a file that must stay untouched."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret").write_text("host data\n")
    yield directory
    assert (directory / "secret").read_text() == "host data\n"


def upload(store: VolumeStore, path: str, data: bytes, mode: int = 0o644) -> None:
    writer = store.open_upload("vol", path, mode)
    writer.write(data)
    writer.commit()


def download(store: VolumeStore, path: str) -> bytes:
    reader = store.open_download("vol", path)
    try:
        chunks = []
        while data := reader.read():
            chunks.append(data)
        return b"".join(chunks)
    finally:
        reader.close()


def paths(store: VolumeStore, pattern: str) -> list[str]:
    entries, truncated = store.list_path("vol", pattern)
    assert not truncated
    return [entry.path for entry in entries]


# Names, paths and globs.


@pytest.mark.parametrize("name", ["a", "data", "my-vol.1_x", "0", "a" * 63])
def test_name_valid(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize(
    "name", ["", "A", "-a", ".a", "_a", "a/b", "a b", "a" * 64, "é", "..", "a\0"]
)
def test_name_invalid(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid volume name"):
        check_name(name)


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("", []),
        ("/", []),
        (".", []),
        ("//", []),
        ("a/..", []),
        ("../../..", []),
        ("a/b", ["a", "b"]),
        ("/a//b/", ["a", "b"]),
        ("a/./b/../c", ["a", "c"]),
        ("../../etc/passwd", ["etc", "passwd"]),
    ],
)
def test_split_path(path: str, parts: list[str]) -> None:
    assert split_path(path) == parts


def test_split_path_rejects_nul() -> None:
    with pytest.raises(InvalidArgument, match="NUL"):
        split_path("a\0b")


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.txt", "a.txt", True),
        ("*.txt", ".hidden.txt", True),
        ("*.txt", "dir/a.txt", False),
        ("*/*.txt", "dir/a.txt", True),
        ("dir/**", "dir", True),
        ("dir/**", "dir/a/b/c", True),
        ("dir/**", "other/a", False),
        ("**/*.py", "a.py", True),
        ("**/*.py", "x/y/a.py", True),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/x/y/c", False),
        ("?.log", "1.log", True),
        ("?.log", "12.log", False),
        ("[ab].c", "b.c", True),
        ("[!ab].c", "b.c", False),
    ],
)
def test_glob_match(pattern: str, path: str, expected: bool) -> None:
    assert glob_match(pattern.split("/"), path.split("/")) is expected


# Volumes.


def test_create_layout(store: VolumeStore) -> None:
    info, created = store.create("vol")
    assert created
    assert info.name == "vol"
    top = store.directory / "vol"
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o711
    assert store.directory.stat().st_uid == 0
    assert stat.S_IMODE(top.stat().st_mode) == 0o700
    assert top.stat().st_uid == UID
    data = store.data_path("vol")
    assert data == top / "data"
    assert data.stat().st_uid == UID
    assert data.stat().st_gid == UID
    assert stat.S_IMODE(data.stat().st_mode) == 0o755


def test_create_existing(store: VolumeStore) -> None:
    first, _ = store.create("vol")
    second, created = store.create("vol")
    assert not created
    assert second.created_at == first.created_at


def test_create_concurrent(store: VolumeStore) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        results.append(store.create("race")[1])

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1
    assert len(results) == 8
    assert sorted(os.listdir(store.directory)) == ["race"]


def test_create_invalid_name(store: VolumeStore) -> None:
    with pytest.raises(InvalidArgument, match="'Bad'"):
        store.create("Bad")


def test_get_missing(store: VolumeStore) -> None:
    with pytest.raises(NotFound, match="volume 'nope' not found"):
        store.get("nope")


def test_list_sizes(store: VolumeStore, root: Path) -> None:
    store.create("empty")
    (root / "a").write_bytes(b"x" * 10)
    (root / "dir").mkdir()
    (root / "dir" / "b").write_bytes(b"y" * 5)
    os.link(root / "a", root / "dir" / "hardlink")
    os.symlink("/etc/passwd", root / "link")
    volumes = {info.name: info for info in store.list()}
    assert sorted(volumes) == ["empty", "vol"]
    assert volumes["vol"].size_bytes == 15
    assert volumes["vol"].file_count == 2
    assert volumes["empty"].size_bytes == 0
    assert volumes["empty"].file_count == 0


def test_delete_removes_files(store: VolumeStore, root: Path, outside: Path) -> None:
    (root / "f").write_text("x")
    os.symlink(outside, root / "link")
    store.delete("vol")
    assert os.listdir(store.directory) == []
    with pytest.raises(NotFound):
        store.get("vol")


def test_delete_missing(store: VolumeStore) -> None:
    with pytest.raises(NotFound):
        store.delete("nope")


def test_prepare_removes_leftovers(store: VolumeStore) -> None:
    store.create("keep")
    (store.directory / ".new-0123").mkdir()
    (store.directory / ".deleted-4567").mkdir()
    (store.directory / ".deleted-4567" / "file").write_text("x")
    store.prepare()
    assert sorted(os.listdir(store.directory)) == ["keep"]


# Upload and download.


def test_upload_download(store: VolumeStore, root: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    writer = store.open_upload("vol", "dir/sub/file.bin", 0o640)
    for start in range(0, len(data), 1024 * 1024):
        writer.write(data[start : start + 1024 * 1024])
    info = writer.commit()
    assert info.path == "dir/sub/file.bin"
    assert info.size == len(data)
    assert info.mode == 0o640
    assert download(store, "/dir/sub/file.bin") == data
    target = root / "dir" / "sub" / "file.bin"
    assert target.stat().st_uid == UID
    assert target.stat().st_gid == UID
    assert (root / "dir").stat().st_uid == UID
    assert (root / "dir" / "sub").stat().st_uid == UID


def test_upload_replaces_atomically(store: VolumeStore, root: Path) -> None:
    upload(store, "f", b"old")
    writer = store.open_upload("vol", "f", 0o644)
    writer.write(b"new content")
    assert (root / "f").read_bytes() == b"old"
    writer.commit()
    assert (root / "f").read_bytes() == b"new content"
    assert sorted(os.listdir(root)) == ["f"]


def test_upload_abort_keeps_old(store: VolumeStore, root: Path) -> None:
    upload(store, "f", b"old")
    writer = store.open_upload("vol", "f", 0o644)
    writer.write(b"partial")
    writer.abort()
    assert (root / "f").read_bytes() == b"old"
    assert sorted(os.listdir(root)) == ["f"]


def test_upload_onto_directory(store: VolumeStore, root: Path) -> None:
    (root / "dir").mkdir()
    writer = store.open_upload("vol", "dir", 0o644)
    with pytest.raises(InvalidArgument, match="/dir in volume 'vol'"):
        writer.commit()
    assert os.listdir(root) == ["dir"]


@pytest.mark.parametrize("path", ["", "/", ".", "a/.."])
def test_upload_root_rejected(store: VolumeStore, root: Path, path: str) -> None:
    with pytest.raises(InvalidArgument, match="root"):
        store.open_upload("vol", path, 0o644)


def test_upload_bad_mode(store: VolumeStore, root: Path) -> None:
    with pytest.raises(InvalidArgument, match="mode"):
        store.open_upload("vol", "f", 0o4755)


def test_upload_missing_volume(store: VolumeStore) -> None:
    with pytest.raises(NotFound, match="volume 'nope'"):
        store.open_upload("nope", "f", 0o644)


def test_download_directory(store: VolumeStore, root: Path) -> None:
    (root / "dir").mkdir()
    with pytest.raises(InvalidArgument, match="is a directory"):
        store.open_download("vol", "dir")


def test_download_fifo(store: VolumeStore, root: Path) -> None:
    os.mkfifo(root / "fifo")
    with pytest.raises(InvalidArgument, match="not a file"):
        store.open_download("vol", "fifo")


def test_download_missing(store: VolumeStore, root: Path) -> None:
    with pytest.raises(NotFound, match="/nope in volume 'vol'"):
        store.open_download("vol", "nope")


# Listing and stat.


def make_tree(root: Path) -> None:
    (root / "a.txt").write_text("a")
    (root / "b.log").write_text("b")
    (root / "dir").mkdir()
    (root / "dir" / "c.txt").write_text("c")
    (root / "dir" / "sub").mkdir()
    (root / "dir" / "sub" / "d.txt").write_text("d")
    os.symlink("dir", root / "link")


def test_list_root(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    assert paths(store, "") == ["a.txt", "b.log", "dir", "link"]
    assert paths(store, "/") == ["a.txt", "b.log", "dir", "link"]


def test_list_directory(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    assert paths(store, "dir") == ["dir/c.txt", "dir/sub"]


def test_list_file(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    entries, _ = store.list_path("vol", "a.txt")
    assert len(entries) == 1
    assert entries[0].path == "a.txt"
    assert entries[0].type == PathType.FILE
    assert entries[0].size == 1


def test_list_glob(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    assert paths(store, "*.txt") == ["a.txt"]
    assert paths(store, "**/*.txt") == ["a.txt", "dir/c.txt", "dir/sub/d.txt"]
    assert paths(store, "dir/**") == ["dir", "dir/c.txt", "dir/sub", "dir/sub/d.txt"]
    assert paths(store, "*/*.txt") == ["dir/c.txt"]


def test_list_glob_skips_symlinked_dirs(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    assert paths(store, "link/*") == ["link/c.txt", "link/sub"]
    assert "link/c.txt" not in paths(store, "**")
    assert "link" in paths(store, "**")


def test_list_symlink_entry(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    entries, _ = store.list_path("vol", "")
    link = next(entry for entry in entries if entry.path == "link")
    assert link.type == PathType.SYMLINK
    assert link.target == "dir"


def test_list_limit(store: VolumeStore, root: Path) -> None:
    for index in range(5):
        (root / f"f{index}").write_text("x")
    entries, truncated = store.list_path("vol", "*", limit=3)
    assert [entry.path for entry in entries] == ["f0", "f1", "f2"]
    assert truncated


def test_list_missing(store: VolumeStore, root: Path) -> None:
    with pytest.raises(NotFound):
        store.list_path("vol", "nope")
    assert paths(store, "nope/*") == []


def test_stat_path(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    directory = store.stat_path("vol", "dir")
    assert directory.type == PathType.DIRECTORY
    link = store.stat_path("vol", "link")
    assert link.type == PathType.SYMLINK
    assert link.target == "dir"
    top = store.stat_path("vol", "")
    assert top.path == ""
    assert top.type == PathType.DIRECTORY


# Move, copy and delete.


def test_move_rename(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    info = store.move_path("vol", "a.txt", "renamed.txt")
    assert info.path == "renamed.txt"
    assert (root / "renamed.txt").read_text() == "a"
    assert not (root / "a.txt").exists()


def test_move_into_directory(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    info = store.move_path("vol", "a.txt", "dir")
    assert info.path == "dir/a.txt"
    assert (root / "dir" / "a.txt").read_text() == "a"


def test_move_trailing_slash_needs_directory(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    with pytest.raises(NotFound, match="/missing in volume"):
        store.move_path("vol", "a.txt", "missing/")
    with pytest.raises(InvalidArgument, match=r"/b\.log in volume"):
        store.copy_path("vol", "a.txt", "b.log/")
    assert (root / "a.txt").read_text() == "a"
    assert (root / "b.log").read_text() == "b"


def test_move_replaces_file(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    store.move_path("vol", "a.txt", "b.log")
    assert (root / "b.log").read_text() == "a"


def test_move_into_itself(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    with pytest.raises(InvalidArgument, match="into itself"):
        store.move_path("vol", "dir", "dir/sub/inner")
    assert (root / "dir" / "c.txt").exists()


def test_move_root_rejected(store: VolumeStore, root: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot move the root"):
        store.move_path("vol", "/", "x")


def test_move_missing(store: VolumeStore, root: Path) -> None:
    with pytest.raises(NotFound, match="/nope in volume 'vol'"):
        store.move_path("vol", "nope", "x")


def test_copy_file(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    (root / "a.txt").chmod(0o600)
    info = store.copy_path("vol", "a.txt", "copy.txt")
    assert info.path == "copy.txt"
    assert (root / "copy.txt").read_text() == "a"
    assert (root / "copy.txt").stat().st_uid == UID
    assert stat.S_IMODE((root / "copy.txt").stat().st_mode) == 0o600
    assert (root / "a.txt").read_text() == "a"


def test_copy_tree(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    os.symlink("../a.txt", root / "dir" / "up")
    info = store.copy_path("vol", "dir", "copy")
    assert info.type == PathType.DIRECTORY
    assert (root / "copy" / "c.txt").read_text() == "c"
    assert (root / "copy" / "sub" / "d.txt").read_text() == "d"
    assert os.readlink(root / "copy" / "up") == "../a.txt"
    assert (root / "copy" / "sub").stat().st_uid == UID
    assert not [name for name in os.listdir(root) if name.startswith(".engine-")]


def test_copy_into_own_subdirectory(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    store.copy_path("vol", "dir", "dir/sub")
    copied = root / "dir" / "sub" / "dir"
    assert (copied / "c.txt").read_text() == "c"
    assert (copied / "sub" / "d.txt").read_text() == "d"
    assert not (copied / "sub" / "dir").exists()


def test_copy_existing_directory_target(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    (root / "target").mkdir()
    (root / "target" / "dir").mkdir()
    (root / "target" / "dir" / "keep").write_text("k")
    with pytest.raises(FailedPrecondition):
        store.copy_path("vol", "dir", "target")
    assert (root / "target" / "dir" / "keep").read_text() == "k"
    assert os.listdir(root / "target") == ["dir"]


def test_delete_path_file(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    assert store.delete_path("vol", "a.txt") == ["a.txt"]
    assert not (root / "a.txt").exists()


def test_delete_path_glob(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    assert store.delete_path("vol", "**/*.txt") == [
        "a.txt",
        "dir/c.txt",
        "dir/sub/d.txt",
    ]
    assert sorted(os.listdir(root)) == ["b.log", "dir", "link"]


def test_delete_path_directory_glob(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    assert store.delete_path("vol", "dir/**") == ["dir"]
    assert not (root / "dir").exists()


def test_delete_path_symlink_only(store: VolumeStore, root: Path) -> None:
    make_tree(root)
    assert store.delete_path("vol", "link") == ["link"]
    assert (root / "dir" / "c.txt").exists()


@pytest.mark.parametrize("pattern", ["", "/", ".", "dir/..", "../.."])
def test_delete_path_root_rejected(
    store: VolumeStore, root: Path, pattern: str
) -> None:
    make_tree(root)
    with pytest.raises(InvalidArgument, match="root of volume"):
        store.delete_path("vol", pattern)
    assert (root / "a.txt").exists()


def test_delete_path_no_match(store: VolumeStore, root: Path) -> None:
    with pytest.raises(NotFound):
        store.delete_path("vol", "*.none")
    with pytest.raises(NotFound):
        store.delete_path("vol", "missing")


# Symlinks that lead out of the volume.


@pytest.fixture
def escapes(root: Path, outside: Path) -> Path:
    """Symlinks to "/", to an absolute host directory and up with "..": ``root``."""
    os.symlink("/", root / "to-root")
    os.symlink(str(outside), root / "to-outside")
    os.symlink("../../../../../../../..", root / "up")
    os.symlink(str(outside / "secret"), root / "to-secret")
    return root


@pytest.mark.parametrize(
    "path",
    [
        "to-root/etc/passwd",
        "up/etc/passwd",
        "to-outside/secret",
        "to-secret",
        "up" + "/.." * 10 + "/etc/passwd",
    ],
)
def test_escape_download(store: VolumeStore, escapes: Path, path: str) -> None:
    with pytest.raises(NotFound):
        store.open_download("vol", path)


def test_escape_download_resolves_inside(store: VolumeStore, escapes: Path) -> None:
    (escapes / "etc").mkdir()
    (escapes / "etc" / "passwd").write_text("volume's own\n")
    assert download(store, "to-root/etc/passwd") == b"volume's own\n"
    assert download(store, "up/etc/passwd") == b"volume's own\n"


def test_escape_upload(store: VolumeStore, escapes: Path, outside: Path) -> None:
    upload(store, "to-root/new.txt", b"in volume")
    upload(store, "up/up-new.txt", b"in volume")
    assert (escapes / "new.txt").read_bytes() == b"in volume"
    assert (escapes / "up-new.txt").read_bytes() == b"in volume"
    assert not Path("/new.txt").exists()
    assert not Path("/up-new.txt").exists()
    # The link's absolute target resolves inside the volume, where it is missing.
    with pytest.raises(NotFound):
        store.open_upload("vol", "to-outside/secret", 0o644)
    with pytest.raises(NotFound):
        store.open_upload("vol", "to-outside/new.txt", 0o644)
    assert not (outside / "new.txt").exists()


def test_escape_upload_replaces_link(store: VolumeStore, escapes: Path) -> None:
    upload(store, "to-secret", b"replaced the link")
    assert not (escapes / "to-secret").is_symlink()
    assert (escapes / "to-secret").read_bytes() == b"replaced the link"


def test_escape_list(store: VolumeStore, escapes: Path, outside: Path) -> None:
    (escapes / "inside.txt").write_text("x")
    listed = paths(store, "to-outside")
    assert listed == ["to-outside"]
    top = paths(store, "*")
    assert "inside.txt" in top
    assert paths(store, "to-root/*") == [f"to-root/{path}" for path in top]
    assert paths(store, "up/*") == [f"up/{path}" for path in top]
    assert paths(store, "to-root") == ["to-root"]
    everything = ["inside.txt", "to-outside", "to-root", "to-secret", "up"]
    assert paths(store, "**") == everything


def test_escape_stat(store: VolumeStore, escapes: Path) -> None:
    with pytest.raises(NotFound):
        store.stat_path("vol", "to-outside/secret")
    assert store.stat_path("vol", "to-root").type == PathType.SYMLINK


def test_escape_delete(store: VolumeStore, escapes: Path, outside: Path) -> None:
    with pytest.raises(NotFound):
        store.delete_path("vol", "to-outside/secret")
    with pytest.raises(NotFound):
        store.delete_path("vol", "to-outside/*")
    with pytest.raises(NotFound):
        store.delete_path("vol", "up/tmp")
    assert store.delete_path("vol", "to-outside") == ["to-outside"]
    assert outside.is_dir()


def test_escape_move(store: VolumeStore, escapes: Path, outside: Path) -> None:
    with pytest.raises(NotFound):
        store.move_path("vol", "to-outside/secret", "stolen")
    (escapes / "mine").write_text("mine")
    info = store.move_path("vol", "mine", "to-outside")
    assert info.path == "to-outside"
    assert (escapes / "to-outside").read_text() == "mine"
    assert not (outside / "mine").exists()
    (escapes / "mine2").write_text("mine2")
    store.move_path("vol", "mine2", "to-root/")
    assert (escapes / "mine2").read_text() == "mine2"


def test_escape_copy(store: VolumeStore, escapes: Path, outside: Path) -> None:
    with pytest.raises(NotFound):
        store.copy_path("vol", "to-outside/secret", "stolen")
    info = store.copy_path("vol", "to-secret", "copied-link")
    assert info.type == PathType.SYMLINK
    assert not (escapes / "copied-link").resolve().is_relative_to(escapes)
    assert os.readlink(escapes / "copied-link") == str(outside / "secret")
    (escapes / "mine").write_text("mine")
    store.copy_path("vol", "mine", "up/copied")
    assert (escapes / "copied").read_text() == "mine"
    assert not (outside / "copied").exists()


def test_escape_usage(store: VolumeStore, escapes: Path) -> None:
    size, count = store.usage("vol")
    assert size == 0
    assert count == 0
