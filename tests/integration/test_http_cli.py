"""`engine deploy`, `engine deployment` and `engine token` against a real daemon."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from beam_support import ENGINE_BIN, Beam

from engine.core.tokens import hash_token

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def engine(beam: Beam, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [str(ENGINE_BIN), *args, "--address", beam.daemon.address],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_deploy_prints_id_version_urls(beam: Beam) -> None:
    env = dict(os.environ, ENGINE_HTTP_URL=beam.base_url)
    target = f"{beam.app_dir / 'app.py'}:square"
    first = engine(
        beam, "deploy", target, "--name", "cli-square", "--endpoint", env=env
    )
    assert first.returncode == 0, first.stderr
    match = re.search(rf"^id: ({UUID})$", first.stdout, re.MULTILINE)
    assert match is not None, first.stdout
    beam.deployed.append(match.group(1))
    assert "version: 1" in first.stdout
    assert f"url: POST {beam.base_url}/endpoint/cli-square\n" in first.stdout
    assert f"url: POST {beam.base_url}/endpoint/cli-square/v1\n" in first.stdout
    assert f"/endpoint/id/{match.group(1)}" in first.stdout

    second = engine(
        beam,
        "deploy",
        target,
        "--name",
        "cli-square",
        "--endpoint",
        "--cpu",
        "0.5",
        "--memory",
        "256Mi",
        "--timeout",
        "5",
        "--keep-warm",
        "0",
        "--workers",
        "2",
        "--json",
    )
    assert second.returncode == 0, second.stderr
    shown = json.loads(second.stdout)
    beam.deployed.append(shown["id"])
    assert shown["version"] == 2
    assert shown["cpu"] == 0.5
    assert shown["memory_mib"] == 256
    assert shown["timeout"] == 5
    assert shown["keep_warm"] == 0
    assert shown["workers"] == 2

    with beam.client() as client:
        response = client.post("/endpoint/cli-square/v2", json={"x": 9})
    assert response.status_code == 200
    assert response.json() == {"y": 81}


def test_deployment_ls_show_rm(beam: Beam) -> None:
    target = f"{beam.app_dir / 'app.py'}:sleep"
    deployed = engine(
        beam,
        "deploy",
        target,
        "--name",
        "cli-queue",
        "--taskqueue",
        "--retries",
        "2",
        "--callback-url",
        "http://127.0.0.1:9/hook",
        "--json",
    )
    assert deployed.returncode == 0, deployed.stderr
    deployment_id = json.loads(deployed.stdout)["id"]
    beam.deployed.append(deployment_id)

    listed = engine(beam, "deployment", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert deployment_id in [item["id"] for item in json.loads(listed.stdout)]
    table = engine(beam, "deployment", "ls", "--name", "cli-queue")
    assert deployment_id in table.stdout
    shown = engine(beam, "deployment", "show", deployment_id)
    assert shown.returncode == 0, shown.stderr
    details = json.loads(shown.stdout)
    assert details["kind"] == "taskqueue"
    assert details["retries"] == 2
    assert details["callback_url"] == "http://127.0.0.1:9/hook"

    removed = engine(beam, "deployment", "rm", deployment_id)
    assert removed.returncode == 0, removed.stderr
    missing = engine(beam, "deployment", "show", deployment_id)
    assert missing.returncode == 1
    assert "not found" in missing.stderr
    assert not (
        beam.daemon.data_dir / "deployments" / f"{deployment_id}.tar.gz"
    ).exists()


def test_deploy_bad_input(beam: Beam, tmp_path: Path) -> None:
    target = f"{beam.app_dir / 'app.py'}:square"
    cases = [
        (["deploy", target, "--name", "Bad_Name", "--endpoint"], "invalid deployment"),
        (["deploy", "app.txt:square", "--name", "x", "--endpoint"], "invalid target"),
        (
            ["deploy", str(tmp_path / "no.py:f"), "--name", "x", "--endpoint"],
            "not found",
        ),
        (
            ["deploy", target, "--name", "x", "--endpoint", "--workers", "0"],
            "invalid --workers",
        ),
        (
            ["deploy", target, "--name", "x", "--endpoint", "--retries=-1"],
            "invalid --retries",
        ),
        (
            [
                "deploy",
                target,
                "--name",
                "x",
                "--endpoint",
                "--callback-url",
                "http://h",
            ],
            "task queues only",
        ),
        (
            [
                "deploy",
                target,
                "--name",
                "x",
                "--taskqueue",
                "--callback-url",
                "ftp://h",
            ],
            "invalid callback_url",
        ),
    ]
    for args, message in cases:
        result = engine(beam, *args)
        assert result.returncode == 1, args
        assert message in result.stderr, (args, result.stderr)
    neither = engine(beam, "deploy", target, "--name", "x")
    assert neither.returncode == 2


def test_token_create_prints_token_alone(beam: Beam) -> None:
    result = subprocess.run(
        [
            str(ENGINE_BIN),
            "token",
            "create",
            "--data-dir",
            str(beam.daemon.data_dir),
            "--workspace",
            "cli-team",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    token = lines[0]
    assert len(token) >= 43
    db = sqlite3.connect(beam.daemon.data_dir / "engine.db")
    try:
        rows = db.execute("SELECT hash, workspace FROM api_tokens").fetchall()
    finally:
        db.close()
    assert (hash_token(token), "cli-team") in rows
    assert all(token not in row[0] for row in rows)
    with beam.client(token=token) as client:
        assert client.get("/health").status_code == 200
        # Another workspace: the default workspace's deployments are hidden.
        assert client.post("/endpoint/cli-square").status_code == 404


def test_serve_http_bad_address(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        cases = [
            ("nonsense", "invalid --http address 'nonsense'"),
            ("127.0.0.1:http", "invalid --http address"),
            (f"127.0.0.1:{port}", f"failed to listen on 127.0.0.1:{port} for HTTP"),
        ]
        for address, message in cases:
            result = subprocess.run(
                [
                    str(ENGINE_BIN),
                    "serve",
                    "--data-dir",
                    str(data_dir),
                    "--http",
                    address,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 1, address
            assert message in result.stderr, (address, result.stderr)
            assert not (data_dir / "engine.sock").exists(), address
            assert not (data_dir / "engine.db").exists(), address
    finally:
        busy.close()
