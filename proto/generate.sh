#!/bin/sh
# Regenerate engine/v1/*_pb2{,_grpc}.py and *_pb2.pyi from every .proto file in
# proto/engine/v1/. Run it from any directory. The output lands in the
# repository's engine/v1/, where tests/unit/test_proto_current.py checks it.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-"$root/.venv/bin/python"}
cd "$root"
"$python" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. \
    --grpc_python_out=. proto/engine/v1/*.proto
