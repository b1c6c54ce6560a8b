"""The engine's host uid range: a configurable base, and no overlap with subuid."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.config import Config
from engine.errors import FailedPrecondition
from tests.conftest import EngineRunner, make_data_dir, start_runner, stop_runner
from tests.integration.conftest import ENGINE_BIN

OTHER_BASE = 1 << 21


def test_overlapping_subuid_rejected(tmp_path: Path) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text("alice:100000:65536\n")
    data_dir = make_data_dir()
    config = dataclasses.replace(
        Config.from_data_dir(data_dir), subordinate_id_files=(subuid,)
    )
    runner = EngineRunner(data_dir, config=config)
    try:
        with pytest.raises(FailedPrecondition) as raised:
            runner.start()
        message = str(raised.value)
        assert "alice:100000:65536" in message
        assert "--uid-base 1048576" in message
        assert os.listdir(data_dir) == []
    finally:
        runner.stop_loop()
        shutil.rmtree(data_dir)


def test_other_uid_base_maps_sandboxes() -> None:
    config = Config.from_data_dir(make_data_dir(), uid_base=OTHER_BASE)
    runner = start_runner(config=config)
    try:
        sandbox_id = runner.create()
        result = runner.run(sandbox_id, ["cat", "/proc/self/uid_map"])
        assert result.text.split() == ["0", str(OTHER_BASE), "65536"]
        host_uids = {
            os.stat(f"/proc/{pid}").st_uid for pid in runner.host_pids(sandbox_id)
        }
        assert host_uids == {OTHER_BASE}
    finally:
        stop_runner(runner)


def test_serve_rejects_bad_uid_base() -> None:
    result = subprocess.run(
        [str(ENGINE_BIN), "serve", "--uid-base", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "invalid uid base '0'" in result.stderr
