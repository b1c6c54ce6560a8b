#!/usr/bin/env bash
# Install the engine's system packages and its virtualenv (.venv) in this
# checkout. With --demo, run the demo afterwards. Needs root, because apt-get
# and the engine itself (namespaces, cgroups, mounts) need it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo bash scripts/install.sh)" >&2
    exit 1
fi

# fuse3 brings libfuse3, which mfusepy loads for fsspec volumes and bucket
# mounts. libnftables1 is the library behind nft, which the engine loads for
# its packet filter rules. btrfs-progs: mkfs.btrfs formats the file system of
# the sandboxes' writable layers, whose quota groups are the per-sandbox disk
# limits. busybox-static is the userland of the hostile images in the escape
# tests. gcc and libc6-dev build engine-init (engine/runtime/native), each
# sandbox's supervisor and PID 1, as a static executable. linux-perf samples
# engine-init, a C program, in `python -m benchmarks.profile`.
packages=(libseccomp2 libnftables1 debootstrap python3-venv btrfs-progs bubblewrap runc fuse3 busybox-static gcc libc6-dev linux-perf)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: Python 3.11 or newer is required; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
.venv/bin/python -m engine.runtime.initbin >/dev/null
echo "install.sh: installed; the CLI is .venv/bin/engine"

if [ "${1:-}" = "--demo" ]; then
    exec .venv/bin/python -m engine.demo
fi
