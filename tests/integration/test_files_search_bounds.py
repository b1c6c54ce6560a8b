"""Bounds of find_in_files and replace_in_files over large or hostile trees."""

from __future__ import annotations

import secrets
import time

from engine.errors import ResourceExhausted
from engine.runtime.files import MAX_SEARCH_SECONDS
from engine.sdk import SandboxInstance

# Seconds of slack on top of MAX_SEARCH_SECONDS for the RPC around the walk.
RPC_SLACK_SECONDS = 15.0


def test_find_from_root_skips_proc(sandbox: SandboxInstance) -> None:
    marker = f"engine-marker-{secrets.token_hex(6)}"
    sandbox.fs.write_text("/tmp/marked.txt", f"{marker}\n")
    # /proc/self/cmdline of the exec below contains the marker too, so a
    # walk that entered /proc would report it.
    sandbox.process.exec("sh", "-c", f"exec sleep 30 # {marker}")
    start = time.monotonic()
    matches = sandbox.fs.find_in_files("/", marker)
    elapsed = time.monotonic() - start
    paths = [match.path for match in matches]
    assert elapsed < MAX_SEARCH_SECONDS + RPC_SLACK_SECONDS
    assert not [path for path in paths if path.startswith("/proc/")]
    if not matches.truncated:
        assert "/tmp/marked.txt" in paths


def test_find_in_proc_itself_allowed(sandbox: SandboxInstance) -> None:
    # File workers run outside the sandbox's PID namespace, so the sandbox's
    # /proc has no "self" for them; PID 1's entries are there for everyone.
    matches = sandbox.fs.find_in_files("/proc/1/status", "^Name:")
    assert len(matches) == 1
    assert matches[0].text.split() == ["Name:", "init"]


def test_replace_from_root_ends_in_time(sandbox: SandboxInstance) -> None:
    start = time.monotonic()
    try:
        sandbox.fs.replace_in_files("/", "engine-pattern-that-matches-nothing-x7", "y")
    except ResourceExhausted as error:
        # The walk over the host image's /usr may reach its time limit.
        assert "stopped after" in str(error)
    elapsed = time.monotonic() - start
    assert elapsed < MAX_SEARCH_SECONDS + RPC_SLACK_SECONDS
