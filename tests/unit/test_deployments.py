"""DeploymentStore: versions, package checks and tokens, on a real SQLite file."""

from __future__ import annotations

import io
import sqlite3
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.core.deployments import (
    DeploymentKind,
    DeploymentSpec,
    DeploymentStore,
    package_directory,
)
from engine.errors import InvalidArgument, NotFound


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DeploymentStore]:
    db = sqlite3.connect(tmp_path / "engine.db", isolation_level=None)
    try:
        yield DeploymentStore(db, tmp_path / "deployments")
    finally:
        db.close()


def make_package(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def spec(name: str = "app", handler: str = "app:main", **fields) -> DeploymentSpec:
    return DeploymentSpec(
        name=name, kind=DeploymentKind.ENDPOINT, handler=handler, **fields
    )


PACKAGE = make_package({"app.py": b"def main():\n    return 1\n"})


def test_versions_count_per_name_and_workspace(store: DeploymentStore) -> None:
    first = store.create(spec(), PACKAGE)
    second = store.create(spec(), PACKAGE)
    other_name = store.create(spec(name="other"), PACKAGE)
    other_space = store.create(spec(workspace="team"), PACKAGE)
    assert [first.version, second.version] == [1, 2]
    assert other_name.version == 1
    assert other_space.version == 1
    assert store.find("default", "app").deployment_id == second.deployment_id
    assert store.find("default", "app", 1).deployment_id == first.deployment_id
    assert store.package_path(first.deployment_id).read_bytes() == PACKAGE


def test_find_and_get_respect_workspace(store: DeploymentStore) -> None:
    created = store.create(spec(), PACKAGE)
    with pytest.raises(NotFound):
        store.find("team", "app")
    with pytest.raises(NotFound):
        store.get(created.deployment_id, "team")
    with pytest.raises(NotFound):
        store.find("default", "app", 2)
    assert store.get(created.deployment_id, "default") == created


def test_delete_removes_package(store: DeploymentStore) -> None:
    created = store.create(spec(), PACKAGE)
    store.delete(created.deployment_id)
    assert not store.package_path(created.deployment_id).exists()
    with pytest.raises(NotFound):
        store.get(created.deployment_id)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"other.py": b""}, "handler module 'app' is not in the package"),
        ({"../app.py": b""}, "paths must be relative"),
        ({"/app.py": b""}, "paths must be relative"),
    ],
)
def test_package_rejected(
    store: DeploymentStore, files: dict[str, bytes], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        store.create(spec(), make_package(files))
    assert list(store.directory.iterdir()) == []


def test_package_symlink_and_garbage_rejected(store: DeploymentStore) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        link = tarfile.TarInfo("app.py")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/shadow"
        archive.addfile(link)
    with pytest.raises(InvalidArgument, match="only regular files"):
        store.create(spec(), buffer.getvalue())
    with pytest.raises(InvalidArgument, match="not a gzip-compressed tar"):
        store.create(spec(), b"not a tar")
    assert store.list("default") == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "Upper"}, "invalid deployment name"),
        ({"name": "id"}, "invalid deployment name 'id'"),
        ({"handler": "app"}, "invalid handler"),
        ({"handler": "app:1x"}, "invalid handler"),
        ({"workspace": "../x"}, "invalid workspace"),
        ({"workers": 65}, "invalid workers"),
        ({"retries": 101}, "invalid retries"),
        ({"cpu": -1.0}, "invalid cpu"),
        ({"memory_mib": 8}, "invalid memory"),
        ({"callback_url": "http://127.0.0.1/"}, "task queues only"),
    ],
)
def test_spec_rejected(store: DeploymentStore, fields: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        store.create(spec(**fields), PACKAGE)


def test_package_directory_skips_caches(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("x = 1\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "app.pyc").write_bytes(b"\0")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("")
    (tmp_path / "link.py").symlink_to("/etc/hostname")
    package = package_directory(tmp_path)
    with tarfile.open(fileobj=io.BytesIO(package), mode="r:gz") as archive:
        names = sorted(archive.getnames())
    assert names == ["app.py", "pkg", "pkg/mod.py"]
