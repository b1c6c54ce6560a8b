"""The committed engine/v1 modules match what protoc generates from the proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ["sandbox", "volume", "filesystem", "deployment"]
GENERATED = [
    f"{proto}{suffix}"
    for proto in PROTOS
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(ROOT / "proto" / "engine" / "v1" / f"{p}.proto") for p in PROTOS),
        ],
        check=True,
    )
    return out / "engine" / "v1"


@pytest.mark.parametrize("name", GENERATED)
def test_stub_matches_proto(regenerated: Path, name: str) -> None:
    committed = (ROOT / "engine" / "v1" / name).read_bytes()
    fresh = (regenerated / name).read_bytes()
    assert committed == fresh, (
        f"engine/v1/{name} is stale; run proto/generate.sh and commit the result"
    )


def test_stubs_import() -> None:
    from engine.v1 import (
        filesystem_pb2,
        filesystem_pb2_grpc,
        sandbox_pb2,
        sandbox_pb2_grpc,
        volume_pb2,
        volume_pb2_grpc,
    )

    assert sandbox_pb2.DESCRIPTOR.package == "engine.v1"
    assert hasattr(sandbox_pb2_grpc, "SandboxServiceStub")
    assert filesystem_pb2.DESCRIPTOR.package == "engine.v1"
    assert hasattr(filesystem_pb2_grpc, "FileServiceStub")
    assert volume_pb2.DESCRIPTOR.package == "engine.v1"
    assert hasattr(volume_pb2_grpc, "VolumeServiceStub")
