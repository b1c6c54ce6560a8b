"""`engine serve` raises its soft RLIMIT_NOFILE to the hard limit before it starts."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, logging, resource, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from engine.server.daemon import raise_open_file_limit
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))
    old, new = raise_open_file_limit()
    print(json.dumps([old, new, list(resource.getrlimit(resource.RLIMIT_NOFILE))]))
    """
)


def _run(soft: int) -> tuple[list, str]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(soft)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout), result.stderr


def test_soft_limit_raised_to_hard() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = min(hard, 256)
    (old, new, limits), log = _run(soft)
    assert old == soft
    assert limits[1] == hard
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as file:
            expected = int(file.read())
    else:
        expected = hard
    assert new == expected
    assert limits[0] == expected
    if soft < expected:
        assert f"raised the open file limit (RLIMIT_NOFILE) from {soft}" in log


def test_limit_at_hard_left_alone() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as file:
            hard = int(file.read())
    (old, new, limits), log = _run(hard)
    assert old == new == hard
    assert limits[0] == hard
    assert "raised the open file limit" not in log
