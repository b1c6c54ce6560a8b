#!/usr/bin/env bash
# Run the whole test suite against the real kernel. Installs first when the
# checkout has no .venv yet, so it also works on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/pytest ]; then
    bash scripts/install.sh
fi
.venv/bin/ruff format --check engine tests benchmarks
.venv/bin/ruff check engine tests benchmarks
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
