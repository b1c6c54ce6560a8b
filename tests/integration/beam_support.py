"""Helpers of the HTTP tests: a real daemon with --http, tokens and deployments.

The daemon is `.venv/bin/engine serve --http 127.0.0.1:0`; its HTTP port is
read from the log line it writes once the server listens. Deployments are
made through the DeploymentService over the daemon's unix socket and deleted
by id at teardown.
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from engine.core.deployments import (
    Deployment,
    DeploymentKind,
    DeploymentSpec,
    package_directory,
)
from engine.sdk.deploy import DeploymentClient

ROOT = Path(__file__).resolve().parents[2]
ENGINE_BIN = ROOT / ".venv" / "bin" / "engine"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
SERVING_LINE = re.compile(r"engine daemon serving on .*(http://[0-9.]+:[0-9]+)")

# Functions that the tests deploy; one module, imported once per container.
APP_SOURCE = textwrap.dedent(
    """
    import os
    import time

    CALLS = {"count": 0}
    IMPORTED_AT = time.time()


    def echo(**kwargs):
        CALLS["count"] += 1
        return {"kwargs": kwargs, "calls": CALLS["count"], "imported_at": IMPORTED_AT}


    def square(x=0):
        return {"y": x * x}


    def fail(message="bad value"):
        raise ValueError(message)


    def sleep(seconds=0.0, value=None):
        time.sleep(seconds)
        return {"slept": seconds, "value": value}


    def scalar():
        return 42


    def unserializable():
        return {"object": object()}


    def noop():
        return None


    def write_output(name="result.txt", text="hello"):
        directory = os.environ["ENGINE_OUTPUTS_DIR"]
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as file:
            file.write(text)
        return {"written": name}


    def save_output(text="saved"):
        from engine_output import Output

        with open("/tmp/report.txt", "w") as file:
            file.write(text)
        Output(path="/tmp/report.txt").save()
        return {"saved": True}


    def forge_frame():
        # Write a frame header announcing 2 GiB to every pipe except stdio,
        # which includes the runner's private frame descriptor.
        import stat
        import struct

        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode):
                    os.write(fd, struct.pack(">I", 2**31) + b"x" * 1024)
            except OSError:
                pass
        time.sleep(30)
        return {"forged": False}


    def flaky(marker="/tmp/flaky-marker", failures=1):
        count = 0
        if os.path.exists(marker):
            with open(marker) as file:
                count = int(file.read())
        with open(marker, "w") as file:
            file.write(str(count + 1))
        if count < failures:
            raise RuntimeError(f"attempt {count + 1} fails on purpose")
        return {"attempt": count + 1}
    """
)


@dataclass
class BeamDaemon:
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    base_url: str = ""

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "engine.sock"

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"daemon {self.process.pid} ignored SIGTERM; log:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT)


def make_data_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="eng-", dir="/tmp"))
    path.chmod(0o755)
    return path


def start_beam_daemon(data_dir: Path, port: int = 0) -> BeamDaemon:
    """Start `engine serve --http` on ``data_dir`` and wait for its HTTP line."""
    log_path = data_dir.parent / f"{data_dir.name}.log"
    # A restarted daemon appends to the log of the previous one.
    start_offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                str(ENGINE_BIN),
                "serve",
                "--data-dir",
                str(data_dir),
                "--http",
                f"127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon = BeamDaemon(process, data_dir, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"daemon exited with {process.returncode}; log:\n{daemon.log()}"
            )
        match = SERVING_LINE.search(daemon.log()[start_offset:])
        if match:
            daemon.base_url = match.group(1)
            return daemon
        time.sleep(0.05)
    daemon.stop()
    raise AssertionError(f"daemon did not serve HTTP in time; log:\n{daemon.log()}")


def create_token(data_dir: Path, workspace: str = "default") -> str:
    result = subprocess.run(
        [
            str(ENGINE_BIN),
            "token",
            "create",
            "--data-dir",
            str(data_dir),
            "--workspace",
            workspace,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


@dataclass
class Beam:
    """A daemon with a token, an HTTP client and a deploy helper."""

    daemon: BeamDaemon
    token: str
    app_dir: Path
    deployed: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.daemon.base_url

    def client(self, token: str | None = None, **options: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=options.pop("timeout", 60.0),
            **options,
        )

    def async_client(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=options.pop("timeout", 120.0),
            **options,
        )

    def deploy(
        self,
        name: str,
        function: str,
        kind: DeploymentKind = DeploymentKind.ENDPOINT,
        **settings: Any,
    ) -> Deployment:
        spec = DeploymentSpec(
            name=name, kind=kind, handler=f"app:{function}", **settings
        )
        with DeploymentClient(self.daemon.address) as client:
            deployment = client.deploy(spec, package_directory(self.app_dir))
        self.deployed.append(deployment.deployment_id)
        return deployment

    @staticmethod
    def wait_task(
        client: httpx.Client, task_id: str, statuses: set[str], timeout: float = 60.0
    ) -> dict[str, Any]:
        return wait_task(client, task_id, statuses, timeout)

    def delete_all(self) -> None:
        with DeploymentClient(self.daemon.address) as client:
            for deployment_id in self.deployed:
                try:
                    client.delete(deployment_id)
                except Exception as error:  # Deleted by the test itself.
                    if "not found" not in str(error):
                        raise
        self.deployed.clear()


def write_app(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "app.py").write_text(APP_SOURCE)
    return directory


def wait_task(
    client: httpx.Client,
    task_id: str,
    statuses: set[str],
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Poll GET /v2/task/ID/ until the status is one of ``statuses``."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/v2/task/{task_id}/")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in statuses:
            return body
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} is {body.get('status')} after {timeout} s")
