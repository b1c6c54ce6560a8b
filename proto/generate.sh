#!/bin/sh
# Regenerate engine/v1/sandbox_pb2{,_grpc}.py and sandbox_pb2.pyi from
# proto/engine/v1/sandbox.proto. Run it from any directory. The output lands in the
# repository's engine/v1/, where tests/unit/test_proto_current.py checks it.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-"$root/.venv/bin/python"}
cd "$root"
"$python" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. \
    --grpc_python_out=. proto/engine/v1/sandbox.proto
