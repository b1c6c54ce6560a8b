"""Deployments: stored code packages and their versions.

A deployment is a gzip-compressed tar of a code directory plus the function
to call in it. Records live in the Engine's SQLite database, next to the
sandboxes; packages live in ``DATA_DIR/deployments/ID.tar.gz``. Each deploy of
a name in a workspace gets the next version number and a fresh UUID. API
tokens are in engine.core.tokens.
"""

from __future__ import annotations

import enum
import io
import json
import os
import re
import sqlite3
import tarfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from engine.core.tenancy import DEFAULT_WORKSPACE, check_workspace
from engine.errors import InvalidArgument, NotFound

# Largest package accepted, in bytes; the gRPC request limit is 16 MiB.
MAX_PACKAGE_BYTES = 15 * 1024 * 1024
# Largest total size of the files in a package once unpacked, in bytes.
MAX_UNPACKED_BYTES = 256 * 1024 * 1024
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
HANDLER_PATTERN = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)
# Directory names never packaged by `package_directory`.
SKIPPED_DIRECTORIES = {"__pycache__", ".git", ".venv", "venv", ".mypy_cache"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    package_bytes INTEGER NOT NULL,
    UNIQUE (workspace, name, version)
);
"""


class DeploymentKind(enum.StrEnum):
    ENDPOINT = "endpoint"
    TASK_QUEUE = "taskqueue"


@dataclass(frozen=True)
class DeploymentSpec:
    """Settings of a deployment; ``resolved`` fills in every default.

    Times are in seconds and ``memory_mib`` in MiB. ``keep_warm`` None means
    the kind's default.
    """

    name: str
    kind: DeploymentKind
    handler: str
    image: str = "host"
    cpu: float = 1.0
    memory_mib: int = 512
    timeout: float = 0.0
    retries: int = 0
    keep_warm: float | None = None
    workers: int = 1
    callback_url: str = ""
    max_pending: int = 0
    traceback: bool = False
    # Empty means the workspace of the call that deploys it.
    workspace: str = ""
    outputs_expire: float = 3600.0

    def resolved(self) -> DeploymentSpec:
        endpoint = self.kind == DeploymentKind.ENDPOINT
        return replace(
            self,
            image=self.image or "host",
            cpu=self.cpu or 1.0,
            memory_mib=self.memory_mib or 512,
            timeout=self.timeout or (180.0 if endpoint else 3600.0),
            keep_warm=(
                self.keep_warm
                if self.keep_warm is not None
                else (180.0 if endpoint else 10.0)
            ),
            workers=self.workers or 1,
            max_pending=self.max_pending or (1000 if endpoint else 100_000),
            workspace=self.workspace or DEFAULT_WORKSPACE,
            outputs_expire=self.outputs_expire or 3600.0,
        )


@dataclass(frozen=True)
class Deployment:
    deployment_id: str
    version: int
    spec: DeploymentSpec
    created_at: float
    package_bytes: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def workspace(self) -> str:
        return self.spec.workspace


def check_spec(spec: DeploymentSpec) -> None:
    """Raise InvalidArgument naming the first invalid field of a resolved spec."""
    if not NAME_PATTERN.match(spec.name):
        raise InvalidArgument(
            f"invalid deployment name {spec.name!r}: use 1 to 63 lowercase letters,"
            " digits or '-', starting with a letter"
        )
    if spec.name == "id":
        raise InvalidArgument(
            "invalid deployment name 'id': /endpoint/id/ routes take deployment"
            " ids; choose another name"
        )
    check_workspace(spec.workspace)
    if not HANDLER_PATTERN.match(spec.handler):
        raise InvalidArgument(
            f"invalid handler {spec.handler!r}: expected MODULE:FUNCTION, such as"
            " app:handler"
        )
    checks = [
        (spec.cpu > 0, f"invalid cpu {spec.cpu}: must be above 0 cores"),
        (
            spec.memory_mib >= 16,
            f"invalid memory {spec.memory_mib} MiB: must be 16 MiB or more",
        ),
        (spec.timeout > 0, f"invalid timeout {spec.timeout}: must be above 0 s"),
        (
            0 <= spec.retries <= 100,
            f"invalid retries {spec.retries}: must be 0 to 100",
        ),
        (
            spec.keep_warm is not None and 0 <= spec.keep_warm <= 86400,
            f"invalid keep_warm {spec.keep_warm}: must be 0 to 86400 s",
        ),
        (
            1 <= spec.workers <= 64,
            f"invalid workers {spec.workers}: must be 1 to 64 containers",
        ),
        (
            1 <= spec.max_pending <= 1_000_000,
            f"invalid max_pending {spec.max_pending}: must be 1 to 1000000",
        ),
        (
            spec.outputs_expire > 0,
            f"invalid outputs expiry {spec.outputs_expire}: must be above 0 s",
        ),
    ]
    for valid, message in checks:
        if not valid:
            raise InvalidArgument(message)
    if spec.callback_url:
        if spec.kind != DeploymentKind.TASK_QUEUE:
            raise InvalidArgument(
                "callback_url is for task queues only; drop it or deploy with"
                " --taskqueue"
            )
        if not re.match(r"^https?://[^/\s]+", spec.callback_url):
            raise InvalidArgument(
                f"invalid callback_url {spec.callback_url!r}: expected an http://"
                " or https:// URL"
            )


def check_package(package: bytes, handler: str) -> int:
    """Check that ``package`` is a safe tar.gz holding the handler's module.

    Returns the unpacked size in bytes. Members must be regular files or
    directories with relative paths that stay inside the package.
    """
    if len(package) > MAX_PACKAGE_BYTES:
        raise InvalidArgument(
            f"package is {len(package)} bytes, over the limit of"
            f" {MAX_PACKAGE_BYTES} bytes; remove large files from the directory"
        )
    module = handler.partition(":")[0].replace(".", "/")
    expected = {f"{module}.py", f"{module}/__init__.py"}
    found = False
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(package), mode="r:gz") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                parts = name.split("/")
                if name.startswith("/") or ".." in parts:
                    raise InvalidArgument(
                        f"invalid package member {member.name!r}: paths must be"
                        " relative and stay inside the package"
                    )
                if not (member.isfile() or member.isdir()):
                    raise InvalidArgument(
                        f"invalid package member {member.name!r}: only regular"
                        " files and directories are allowed"
                    )
                total += member.size
                found = found or name in expected
    except (tarfile.TarError, OSError, EOFError) as error:
        raise InvalidArgument(
            f"invalid package: not a gzip-compressed tar ({error})"
        ) from None
    if total > MAX_UNPACKED_BYTES:
        raise InvalidArgument(
            f"package unpacks to {total} bytes, over the limit of"
            f" {MAX_UNPACKED_BYTES} bytes"
        )
    if not found:
        raise InvalidArgument(
            f"handler module {module.replace('/', '.')!r} is not in the package:"
            f" expected {module}.py at its root"
        )
    return total


def package_directory(directory: Path) -> bytes:
    """Return ``directory`` as a tar.gz, without caches and virtualenvs."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(part in SKIPPED_DIRECTORIES for part in parts):
            return None
        if not (info.isfile() or info.isdir()):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for entry in sorted(directory.iterdir()):
            archive.add(entry, arcname=entry.name, filter=keep)
    return buffer.getvalue()


class DeploymentStore:
    """Deployment records and tokens in SQLite, packages in a directory."""

    def __init__(self, db: sqlite3.Connection, directory: Path) -> None:
        self.db = db
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        db.executescript(SCHEMA)

    def package_path(self, deployment_id: str) -> Path:
        return self.directory / f"{deployment_id}.tar.gz"

    def create(
        self, spec: DeploymentSpec, package: bytes, *, checked: bool = False
    ) -> Deployment:
        """Store the package and record the next version of ``spec.name``.

        ``checked`` skips check_spec and check_package, for a caller that has
        run them already on the resolved spec.
        """
        spec = spec.resolved()
        if not checked:
            check_spec(spec)
            check_package(package, spec.handler)
        deployment_id = str(uuid.uuid4())
        path = self.package_path(deployment_id)
        temporary = path.with_suffix(".partial")
        temporary.write_bytes(package)
        os.replace(temporary, path)
        try:
            # BEGIN IMMEDIATE takes the write lock, so two deploys of one
            # name never read the same maximum version.
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM deployments"
                " WHERE workspace = ? AND name = ?",
                (spec.workspace, spec.name),
            ).fetchone()
            deployment = Deployment(
                deployment_id=deployment_id,
                version=row[0] + 1,
                spec=spec,
                created_at=time.time(),
                package_bytes=len(package),
            )
            self.db.execute(
                "INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    deployment_id,
                    spec.workspace,
                    spec.name,
                    deployment.version,
                    json.dumps(asdict(spec)),
                    deployment.created_at,
                    deployment.package_bytes,
                ),
            )
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            path.unlink(missing_ok=True)
            raise
        return deployment

    @staticmethod
    def _deployment(row: tuple) -> Deployment:
        fields = json.loads(row[4])
        fields["kind"] = DeploymentKind(fields["kind"])
        return Deployment(
            deployment_id=row[0],
            version=row[3],
            spec=DeploymentSpec(**fields),
            created_at=row[5],
            package_bytes=row[6],
        )

    def get(self, deployment_id: str, workspace: str | None = None) -> Deployment:
        """Return a deployment by id; with ``workspace``, only one of that workspace."""
        row = self.db.execute(
            "SELECT * FROM deployments WHERE id = ?", (deployment_id,)
        ).fetchone()
        if row is None or (workspace is not None and row[1] != workspace):
            raise NotFound(f"deployment {deployment_id!r} not found")
        return self._deployment(row)

    def find(
        self,
        workspace: str,
        name: str,
        version: int | None = None,
        kind: DeploymentKind | None = None,
    ) -> Deployment:
        """Return the named deployment's given version, or its latest one."""
        query = "SELECT * FROM deployments WHERE workspace = ? AND name = ?"
        params: list[object] = [workspace, name]
        if version is not None:
            query += " AND version = ?"
            params.append(version)
        row = self.db.execute(
            query + " ORDER BY version DESC LIMIT 1", params
        ).fetchone()
        if row is None:
            what = f"{name!r} version {version}" if version is not None else repr(name)
            raise NotFound(f"deployment {what} not found")
        deployment = self._deployment(row)
        if kind is not None and deployment.spec.kind != kind:
            raise NotFound(f"{kind.value} deployment {name!r} not found")
        return deployment

    def list(self, workspace: str, name: str = "") -> list[Deployment]:
        query = "SELECT * FROM deployments WHERE workspace = ?"
        params: list[object] = [workspace]
        if name:
            query += " AND name = ?"
            params.append(name)
        rows = self.db.execute(query + " ORDER BY created_at DESC", params)
        return [self._deployment(row) for row in rows]

    def delete(self, deployment_id: str) -> Deployment:
        deployment = self.get(deployment_id)
        self.db.execute("DELETE FROM deployments WHERE id = ?", (deployment_id,))
        self.package_path(deployment_id).unlink(missing_ok=True)
        return deployment
