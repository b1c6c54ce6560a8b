"""Fixtures of the HTTP tests; the helpers they use are in beam_support.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from beam_support import (
    Beam,
    BeamDaemon,
    create_token,
    make_data_dir,
    start_beam_daemon,
    write_app,
)


@pytest.fixture(scope="session")
def beam_daemon() -> Iterator[BeamDaemon]:
    """One daemon with --http shared by the tests that do not restart it."""
    data_dir = make_data_dir()
    daemon = start_beam_daemon(data_dir)
    try:
        yield daemon
    finally:
        status = daemon.stop()
        log = daemon.log()
        shutil.rmtree(data_dir, ignore_errors=True)
        if os.environ.get("ENGINE_KEEP_DAEMON_LOG"):
            print(f"daemon log kept at {daemon.log_path}")
        else:
            os.unlink(daemon.log_path)
        assert status == 0, f"daemon exited with {status}; log:\n{log}"


@pytest.fixture(scope="session")
def app_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="eng-app-", dir="/tmp"))
    write_app(directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def session_token(beam_daemon: BeamDaemon) -> str:
    return create_token(beam_daemon.data_dir)


@pytest.fixture
def beam(beam_daemon: BeamDaemon, session_token: str, app_dir: Path) -> Iterator[Beam]:
    """The shared daemon; deployments a test makes are deleted at teardown."""
    helper = Beam(beam_daemon, session_token, app_dir)
    try:
        yield helper
    finally:
        helper.delete_all()


@pytest.fixture
def private_daemon(app_dir: Path) -> Iterator[Callable[..., Beam]]:
    """Start private daemons (for restarts); each is stopped at teardown."""
    started: list[Beam] = []
    data_dirs: list[Path] = []

    def start(data_dir: Path | None = None, token: str | None = None) -> Beam:
        directory = data_dir or make_data_dir()
        if directory not in data_dirs:
            data_dirs.append(directory)
        daemon = start_beam_daemon(directory)
        helper = Beam(daemon, token or create_token(directory), app_dir)
        started.append(helper)
        return helper

    yield start
    failures = []
    for helper in started:
        if helper.daemon.process.poll() is None:
            status = helper.daemon.stop()
            if status != 0:
                failures.append(f"daemon exited with {status}:\n{helper.daemon.log()}")
    for directory in data_dirs:
        shutil.rmtree(directory, ignore_errors=True)
        log_path = directory.parent / f"{directory.name}.log"
        if log_path.exists():
            os.unlink(log_path)
    assert not failures, "\n".join(failures)
