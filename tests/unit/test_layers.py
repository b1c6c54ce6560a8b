"""LayerStore on the real kernel: a btrfs image on a loop device in a temp dir."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import FailedPrecondition, Unavailable
from engine.runtime import btrfs, loop
from engine.storage.layers import (
    IMAGE_NAME,
    MIN_SIZE_BYTES,
    SMALL_LAYER_ITEMS,
    LayerStore,
    is_mount_point,
)

MIB = 1024 * 1024


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="layers-", dir="/tmp"))
    (path / "mnt").mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store(work: Path) -> Iterator[LayerStore]:
    layers = LayerStore(work, work / "mnt", 1024 * MIB)
    layers.start()
    try:
        yield layers
    finally:
        layers.close()


def _fill(directory: Path) -> int:
    """Write 1 MiB chunks until a write fails with EDQUOT; return the bytes written."""
    written = 0
    with open(directory / "fill", "wb", buffering=0) as file:
        chunk = b"x" * MIB
        with pytest.raises(OSError) as caught:
            while True:
                written += file.write(chunk)
    assert caught.value.errno == errno.EDQUOT
    return written


def test_create_limits_layer(store: LayerStore) -> None:
    layer = store.create("sb-one", 32)

    written = _fill(layer)

    assert layer == store.mount_point / "sb-one"
    assert 28 * MIB <= written <= 32 * MIB


def test_remove_deletes_layer(store: LayerStore) -> None:
    layer = store.create("sb-gone", 32)
    (layer / "file").write_bytes(b"data")

    assert store.remove("sb-gone")
    assert not store.remove("sb-gone")

    assert not layer.exists()


def test_used_bytes_counts_writes(store: LayerStore) -> None:
    layer = store.create("sb-used", 64)
    (layer / "file").write_bytes(os.urandom(8 * MIB))
    os.sync()

    used = store.used_bytes("sb-used")

    assert 8 * MIB <= used <= 9 * MIB
    with pytest.raises(FailedPrecondition, match="sb-unknown"):
        store.used_bytes("sb-unknown")


def test_duplicate_create_fails(store: LayerStore) -> None:
    store.create("sb-twice", 32)

    with pytest.raises(OSError) as caught:
        store.create("sb-twice", 32)

    assert caught.value.errno == errno.EEXIST
    assert sorted(os.listdir(store.mount_point)) == ["sb-twice"]


def test_create_makes_owned_dirs(store: LayerStore) -> None:
    layer = store.create("sb-owned", 32, uid=12345)

    assert sorted(os.listdir(layer)) == ["root", "upper", "work"]
    info = os.stat(layer)
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert (info.st_uid, info.st_gid) == (12345, 12345)
    for name in ("root", "upper", "work"):
        info = os.stat(layer / name)
        assert (info.st_uid, info.st_gid) == (12345, 12345)


def test_is_small_counts_files(store: LayerStore) -> None:
    layer = store.create("sb-files", 64)

    assert store.is_small("sb-files")
    for index in range(SMALL_LAYER_ITEMS):
        (layer / "upper" / f"file-{index}").write_bytes(b"")
    assert not store.is_small("sb-files")
    assert not store.is_small("sb-missing")
    store.remove("sb-files")
    assert not store.is_small("sb-files")


def test_create_failure_leaves_nothing(
    store: LayerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_limit(*args: object) -> None:
        raise OSError(errno.EINVAL, "BTRFS_IOC_QGROUP_LIMIT failed")

    monkeypatch.setattr(btrfs, "limit_referenced", fail_limit)
    with pytest.raises(OSError):
        store.create("sb-failed", 32)

    assert os.listdir(store.mount_point) == []
    assert not store.remove("sb-failed")


def test_subvolume_has_own_id(store: LayerStore) -> None:
    first = store.create("sb-a", 32)
    second = store.create("sb-b", 32)

    assert btrfs.subvolume_id(str(first)) != btrfs.subvolume_id(str(second))
    assert btrfs.subvolume_id(str(first)) != btrfs.subvolume_id(str(store.mount_point))


def test_close_releases_everything(work: Path) -> None:
    layers = LayerStore(work, work / "mnt", 512 * MIB)
    layers.start()
    layers.create("sb-left", 32)
    image = str(work / IMAGE_NAME)
    assert len(loop.devices_backed_by(image)) == 1

    layers.close()
    layers.close()

    assert not is_mount_point(work / "mnt")
    assert loop.devices_backed_by(image) == []
    assert not (work / IMAGE_NAME).exists()


def test_start_sweeps_leftover_mount(work: Path) -> None:
    crashed = LayerStore(work, work / "mnt", 512 * MIB)
    crashed.start()
    crashed.create("sb-old", 32)
    # The crashed engine's descriptors closed with its process.
    assert crashed._dir_fd is not None
    os.close(crashed._dir_fd)

    # A second store on the same dirs stands for the next engine start.
    restarted = LayerStore(work, work / "mnt", 512 * MIB)
    restarted.start()
    try:
        assert os.listdir(work / "mnt") == []
        with open("/proc/self/mountinfo", encoding="utf-8") as file:
            mounts = [line for line in file if line.split(" ")[4] == str(work / "mnt")]
        assert len(mounts) == 1
    finally:
        restarted.close()
    assert loop.devices_backed_by(str(work / IMAGE_NAME)) == []
    assert loop.devices_backed_by(f"{work / IMAGE_NAME} (deleted)") == []


def test_too_small_rejected(work: Path) -> None:
    layers = LayerStore(work, work / "mnt", MIN_SIZE_BYTES - MIB)

    with pytest.raises(Unavailable, match="at least 256 MiB"):
        layers.start()

    assert not (work / IMAGE_NAME).exists()
    assert not is_mount_point(work / "mnt")


def test_missing_mkfs_named(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty PATH is what a host without btrfs-progs looks like to the engine.
    monkeypatch.setenv("PATH", str(work))
    layers = LayerStore(work, work / "mnt", 512 * MIB)

    with pytest.raises(Unavailable, match="btrfs-progs"):
        layers.start()

    assert not (work / IMAGE_NAME).exists()
    assert not is_mount_point(work / "mnt")


def test_create_before_start_fails(work: Path) -> None:
    layers = LayerStore(work, work / "mnt", 512 * MIB)

    with pytest.raises(Unavailable, match="not mounted"):
        layers.create("sb-early", 32)
