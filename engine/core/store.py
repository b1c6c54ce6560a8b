"""The Engine's state in SQLite: sandboxes and their processes.

Writes of sandbox and process rows are buffered: ``put_sandbox`` and
``put_process`` keep the newest row per key in memory, and ``flush`` writes
them all in one transaction. The Engine flushes shortly after each change,
every read flushes first, and ``close`` flushes, so a crash of the daemon
loses at most the changes of that short delay. Each exec changes its
process row twice, and one transaction per change cost more than the rest
of the exec's work in the Engine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from pathlib import Path

from engine.core.models import (
    CloudBucketConfig,
    CloudBucketMount,
    ExitReason,
    ProcessInfo,
    ProcessState,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    TerminationReason,
    VolumeMount,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    error TEXT NOT NULL,
    created_at REAL NOT NULL,
    terminated_at REAL,
    last_activity_at REAL NOT NULL,
    workspace TEXT NOT NULL DEFAULT 'default'
);
CREATE TABLE IF NOT EXISTS processes (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    pid INTEGER NOT NULL,
    argv TEXT NOT NULL,
    cwd TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    signal TEXT NOT NULL,
    reason TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    PRIMARY KEY (sandbox_id, pid, started_at)
);
"""
# Both tables have ten columns.
_PLACEHOLDERS = ", ".join("?" * 10)


class Store:
    def __init__(self, path: Path) -> None:
        # The database contains secret values, so only root may read it. SQLite
        # gives its -wal and -shm files the mode of the database file.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # WAL with synchronous=NORMAL keeps a committed row across a daemon
        # crash (only a power loss can lose the last transactions).
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._add_missing_columns()
        # Rows not written yet, newest per primary key.
        self._sandboxes: dict[str, SandboxInfo] = {}
        self._processes: dict[tuple[str, int, float], tuple[str, ProcessInfo]] = {}

    @property
    def dirty(self) -> bool:
        return bool(self._sandboxes or self._processes)

    def flush(self) -> None:
        """Write every buffered row in one transaction."""
        if not self.dirty:
            return
        sandboxes, self._sandboxes = self._sandboxes, {}
        processes, self._processes = self._processes, {}
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                f"INSERT OR REPLACE INTO sandboxes VALUES ({_PLACEHOLDERS})",
                map(self._sandbox_row, sandboxes.values()),
            )
            self.db.executemany(
                f"INSERT OR REPLACE INTO processes VALUES ({_PLACEHOLDERS})",
                (self._process_row(*item) for item in processes.values()),
            )

    def _add_missing_columns(self) -> None:
        """Add the columns that databases of older engine versions lack."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(sandboxes)")}
        if "workspace" not in columns:
            self.db.execute(
                "ALTER TABLE sandboxes ADD COLUMN"
                " workspace TEXT NOT NULL DEFAULT 'default'"
            )

    def close(self) -> None:
        self.flush()
        self.db.close()

    def put_sandbox(self, info: SandboxInfo) -> None:
        self._sandboxes[info.sandbox_id] = info

    @staticmethod
    def _sandbox_row(info: SandboxInfo) -> tuple[object, ...]:
        return (
            info.sandbox_id,
            info.spec.name,
            json.dumps(dataclasses.asdict(info.spec)),
            info.state.value,
            info.reason.value,
            info.error,
            info.created_at,
            info.terminated_at,
            info.last_activity_at,
            info.workspace,
        )

    def sandboxes(self, *, live_only: bool = False) -> list[SandboxInfo]:
        self.flush()
        query = "SELECT * FROM sandboxes"
        if live_only:
            query += " WHERE state != 'TERMINATED'"
        return [
            self._sandbox(row)
            for row in self.db.execute(query + " ORDER BY created_at")
        ]

    @staticmethod
    def _sandbox(row: tuple) -> SandboxInfo:
        fields = json.loads(row[2])
        # dataclasses.asdict stored each VolumeMount as a dict; rows written
        # before volumes existed have no "volumes" key.
        volumes = tuple(VolumeMount(**item) for item in fields.pop("volumes", ()))
        fields["allow_list"] = tuple(fields.get("allow_list", ()))
        secrets = tuple(fields.pop("secrets", ()))
        buckets = tuple(
            CloudBucketMount(
                name=item["name"],
                mount_path=item["mount_path"],
                config=CloudBucketConfig(**item["config"]),
            )
            for item in fields.pop("cloud_buckets", ())
        )
        spec = SandboxSpec(
            **fields, volumes=volumes, secrets=secrets, cloud_buckets=buckets
        )
        return SandboxInfo(
            sandbox_id=row[0],
            spec=spec,
            state=SandboxState(row[3]),
            reason=TerminationReason(row[4]),
            error=row[5],
            created_at=row[6],
            terminated_at=row[7],
            last_activity_at=row[8],
            workspace=row[9],
        )

    def put_process(self, sandbox_id: str, info: ProcessInfo) -> None:
        self._processes[(sandbox_id, info.pid, info.started_at)] = (sandbox_id, info)

    @staticmethod
    def _process_row(sandbox_id: str, info: ProcessInfo) -> tuple[object, ...]:
        return (
            sandbox_id,
            info.pid,
            json.dumps(info.argv),
            info.cwd,
            info.state.value,
            info.exit_code,
            info.signal,
            info.reason.value,
            info.started_at,
            info.ended_at,
        )

    def processes(self, sandbox_id: str, limit: int = -1) -> list[ProcessInfo]:
        """Return the sandbox's processes, oldest first: the last ``limit``, or all."""
        self.flush()
        rows = self.db.execute(
            "SELECT * FROM (SELECT * FROM processes WHERE sandbox_id = ?"
            " ORDER BY started_at DESC LIMIT ?) ORDER BY started_at",
            (sandbox_id, limit),
        )
        return [
            ProcessInfo(
                pid=row[1],
                argv=json.loads(row[2]),
                cwd=row[3],
                state=ProcessState(row[4]),
                exit_code=row[5],
                signal=row[6],
                reason=ExitReason(row[7]),
                started_at=row[8],
                ended_at=row[9],
            )
            for row in rows
        ]
