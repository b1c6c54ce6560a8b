"""benchmarks.stacks: py-spy's collapsed stacks summed per engine process kind."""

from __future__ import annotations

import pytest

from benchmarks.stacks import (
    DAEMON,
    INIT,
    OTHER,
    SUPERVISOR,
    ZYGOTE,
    Frame,
    aggregate,
    parse_line,
    process_kind,
)

DAEMON_PROCESS = 'process 100:"/venv/bin/python /venv/bin/engine serve --data-dir /d"'
ZYGOTE_PROCESS = 'process 200:"/venv/bin/python -m engine.runtime.zygote 9 /init /l"'
# A supervisor and a PID 1 before exec run the zygote's command line.
SUPERVISOR_PROCESS = ZYGOTE_PROCESS.replace("200", "300")
SECOND_SUPERVISOR_PROCESS = ZYGOTE_PROCESS.replace("200", "301")
INIT_PROCESS = ZYGOTE_PROCESS.replace("200", "400")
FUSE_PROCESS = 'process 500:"/venv/bin/python -m engine.storage.fuse /mnt"'

MAIN_THREAD = [
    "<module> (engine:8)",
    "main (engine/cli/main.py:120)",
    "BaseEventLoop.run_forever (asyncio/base_events.py:593)",
    "BaseEventLoop._run_once (asyncio/base_events.py:1845)",
]
CALLBACK = [*MAIN_THREAD, "Handle._run (asyncio/events.py:78)"]
WORKER_THREAD = [
    "Thread._bootstrap (threading.py:995)",
    "Thread.run (threading.py:971)",
    "_worker (concurrent/futures/thread.py:69)",
]
ZYGOTE_LOOP = [
    "_run_module_as_main (<frozen runpy>:198)",
    "main (engine/runtime/zygote.py:234)",
    "Zygote.serve (engine/runtime/zygote.py:92)",
]
SUPERVISOR_ENTRY = [
    *ZYGOTE_LOOP,
    "Zygote.handle (engine/runtime/zygote.py:111)",
    "Zygote.prefork (engine/runtime/zygote.py:123)",
    "run (engine/runtime/supervisor.py:35)",
]


def raw(processes: list[str], frames: list[str], count: int) -> str:
    return ";".join([*processes, *frames]) + f" {count}\n"


CREATE = "Engine.create_sandbox (engine/core/engine.py:487)"
SET_UP = "Engine._set_up (engine/core/engine.py:640)"
SELECT = "EpollSelector.select (selectors.py:451)"
WRITE = "write_control (engine/runtime/cgroups.py:430)"
BUILD_ROOT = "build_root (engine/runtime/isolation.py:133)"
MOUNT = "mount (engine/runtime/libc.py:108)"

DAEMON_LINES = [
    raw([DAEMON_PROCESS], [*CALLBACK, CREATE, SET_UP], 5),
    raw([DAEMON_PROCESS], [*CALLBACK, CREATE], 3),
    raw([DAEMON_PROCESS], [*MAIN_THREAD, SELECT], 10),
    raw([DAEMON_PROCESS], [*WORKER_THREAD, WRITE], 2),
]
TREE_LINES = [
    raw([DAEMON_PROCESS, ZYGOTE_PROCESS], [*ZYGOTE_LOOP, SELECT], 4),
    raw(
        [DAEMON_PROCESS, ZYGOTE_PROCESS],
        [*ZYGOTE_LOOP, "Zygote.prefork (engine/runtime/zygote.py:123)"],
        6,
    ),
    raw(
        [DAEMON_PROCESS, ZYGOTE_PROCESS, SUPERVISOR_PROCESS],
        [*SUPERVISOR_ENTRY, BUILD_ROOT, MOUNT],
        7,
    ),
    raw(
        [DAEMON_PROCESS, ZYGOTE_PROCESS, SECOND_SUPERVISOR_PROCESS],
        [*SUPERVISOR_ENTRY, BUILD_ROOT],
        3,
    ),
    raw(
        [DAEMON_PROCESS, ZYGOTE_PROCESS, SUPERVISOR_PROCESS, INIT_PROCESS],
        [
            *SUPERVISOR_ENTRY,
            "_run_init (engine/runtime/supervisor.py:140)",
            "finish_in_init (engine/runtime/isolation.py:160)",
        ],
        2,
    ),
]


def frame(text: str) -> Frame:
    function, _, rest = text.partition(" (")
    file, _, line = rest.rstrip(")").rpartition(":")
    return Frame(function, file, int(line))


def test_parse_line_splits_processes_frames_count() -> None:
    parsed = parse_line(raw([DAEMON_PROCESS, ZYGOTE_PROCESS], ZYGOTE_LOOP, 12))
    assert parsed is not None
    processes, frames, count = parsed
    assert processes == [
        (100, "/venv/bin/python /venv/bin/engine serve --data-dir /d"),
        (200, "/venv/bin/python -m engine.runtime.zygote 9 /init /l"),
    ]
    assert frames[0] == Frame("_run_module_as_main", "<frozen runpy>", 198)
    assert frames[-1] == Frame("Zygote.serve", "engine/runtime/zygote.py", 92)
    assert len(frames) == 3
    assert count == 12


def test_parse_line_frame_without_line() -> None:
    parsed = parse_line("<module> (engine) 1")
    assert parsed is not None
    assert parsed[1] == [Frame("<module>", "engine", None)]


def test_parse_line_blank_is_none() -> None:
    assert parse_line("\n") is None


def test_parse_line_rejects_missing_count() -> None:
    with pytest.raises(ValueError, match="no sample count"):
        parse_line("main (engine/cli/main.py:120)")


def test_process_kind_by_chain() -> None:
    daemon = DAEMON_PROCESS.split('"')[1]
    zygote = ZYGOTE_PROCESS.split('"')[1]
    fuse = FUSE_PROCESS.split('"')[1]
    supervisor_frames = [frame(text) for text in SUPERVISOR_ENTRY]
    assert process_kind([], []) == DAEMON
    assert process_kind([daemon], []) == DAEMON
    assert process_kind([daemon, zygote], []) == ZYGOTE
    assert process_kind([daemon, fuse], []) == OTHER
    assert process_kind([daemon, zygote, zygote], supervisor_frames) == SUPERVISOR
    assert process_kind([], [], root=ZYGOTE) == ZYGOTE
    assert process_kind([zygote, zygote], supervisor_frames, root=ZYGOTE) == SUPERVISOR


def test_process_kind_rejects_other_root() -> None:
    with pytest.raises(ValueError, match="invalid root kind"):
        process_kind([], [], root=SUPERVISOR)


def test_aggregate_daemon_samples_and_shares() -> None:
    profile = aggregate(DAEMON_LINES)[DAEMON]
    assert profile.samples == 20
    assert profile.pids == {100}
    assert profile.inclusive[frame(CREATE)] == 8
    assert profile.self_samples[frame(CREATE)] == 3
    assert profile.percent(profile.inclusive[frame(CREATE)]) == 40.0
    assert profile.self_samples[frame(SELECT)] == 10
    assert profile.inclusive[frame(WRITE)] == 2


def test_aggregate_drops_entry_frame_callers() -> None:
    profile = aggregate(DAEMON_LINES)[DAEMON]
    loop = frame("BaseEventLoop._run_once (asyncio/base_events.py:1845)")
    assert frame("main (engine/cli/main.py:120)") not in profile.inclusive
    assert frame("Thread.run (threading.py:971)") not in profile.inclusive
    assert profile.inclusive[loop] == 18
    assert profile.inclusive[frame("_worker (concurrent/futures/thread.py:69)")] == 2


def test_aggregate_counts_recursion_once() -> None:
    recursive = "walk (engine/storage/trees.py:10)"
    profile = aggregate([raw([DAEMON_PROCESS], [*CALLBACK, recursive, recursive], 4)])[
        DAEMON
    ]
    assert profile.inclusive[frame(recursive)] == 4
    assert profile.self_samples[frame(recursive)] == 4


def test_aggregate_sorts_subprocesses_by_kind() -> None:
    profiles = aggregate(DAEMON_LINES + TREE_LINES)
    assert set(profiles) == {DAEMON, ZYGOTE, SUPERVISOR, INIT}
    assert profiles[DAEMON].samples == 20
    assert profiles[ZYGOTE].samples == 10
    assert profiles[ZYGOTE].pids == {200}
    assert profiles[SUPERVISOR].samples == 10
    assert profiles[SUPERVISOR].pids == {300, 301}
    assert profiles[INIT].samples == 2
    assert profiles[INIT].pids == {400}


def test_aggregate_supervisor_drops_zygote_frames() -> None:
    profile = aggregate(TREE_LINES)[SUPERVISOR]
    assert frame("Zygote.prefork (engine/runtime/zygote.py:123)") not in (
        profile.inclusive
    )
    assert profile.inclusive[frame("run (engine/runtime/supervisor.py:35)")] == 10
    assert profile.percent(profile.inclusive[frame(BUILD_ROOT)]) == 100.0
    assert profile.percent(profile.self_samples[frame(MOUNT)]) == 70.0
    assert profile.percent(profile.self_samples[frame(BUILD_ROOT)]) == 30.0


def test_aggregate_zygote_root_no_chain() -> None:
    lines = [raw([], [*ZYGOTE_LOOP, SELECT], 3)]
    profiles = aggregate(lines, root=ZYGOTE, pid=200)
    assert set(profiles) == {ZYGOTE}
    assert profiles[ZYGOTE].samples == 3
    assert profiles[ZYGOTE].pids == {200}


def test_top_tables_order_and_shares() -> None:
    profile = aggregate(DAEMON_LINES)[DAEMON]
    inclusive = profile.top_inclusive(4)
    by_self = profile.top_self(2)
    # Handle._run and Engine.create_sandbox tie at 8 samples, so location decides.
    assert [entry[0].function for entry in inclusive] == [
        "BaseEventLoop._run_once",
        "EpollSelector.select",
        "Handle._run",
        "Engine.create_sandbox",
    ]
    assert inclusive[0][1:] == (90.0, 0.0)
    assert inclusive[3][1:] == (40.0, 15.0)
    assert [entry[0].function for entry in by_self] == [
        "EpollSelector.select",
        "Engine._set_up",
    ]
    assert by_self[1][1:] == (25.0, 25.0)


def test_kind_profile_add_sums_rounds() -> None:
    first = aggregate(TREE_LINES[2:3])[SUPERVISOR]
    second = aggregate(TREE_LINES[3:4])[SUPERVISOR]
    first.add(second)
    assert first.samples == 10
    assert first.pids == {300, 301}
    assert first.inclusive[frame(BUILD_ROOT)] == 10
    assert first.self_samples[frame(MOUNT)] == 7
    assert first.self_samples[frame(BUILD_ROOT)] == 3
