"""benchmarks.stacks: py-spy's and perf's stacks summed by function."""

from __future__ import annotations

import pytest

from benchmarks.stacks import (
    KERNEL_OBJECT,
    USER_SPACE,
    Frame,
    PerfSample,
    aggregate,
    descendants,
    kernel_entry,
    kernel_stack,
    parse_line,
    perf_samples,
)

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
PREFORK = "Zygote.prefork (engine/runtime/zygote.py:123)"


def raw(frames: list[str], count: int) -> str:
    return ";".join(frames) + f" {count}\n"


CREATE = "Engine.create_sandbox (engine/core/engine.py:487)"
SET_UP = "Engine._set_up (engine/core/engine.py:640)"
SELECT = "EpollSelector.select (selectors.py:451)"
WRITE = "write_control (engine/runtime/cgroups.py:430)"

DAEMON_LINES = [
    raw([*CALLBACK, CREATE, SET_UP], 5),
    raw([*CALLBACK, CREATE], 3),
    raw([*MAIN_THREAD, SELECT], 10),
    raw([*WORKER_THREAD, WRITE], 2),
]
ZYGOTE_LINES = [
    raw([*ZYGOTE_LOOP, SELECT], 4),
    raw([*ZYGOTE_LOOP, "Zygote.handle (engine/runtime/zygote.py:111)", PREFORK], 6),
]

# Cut down from `perf script --show-task-events -F comm,pid,tid,ip,sym,dso`
# of perf 6.1. The zygote (300) spawns a supervisor (301), which forks PID 1
# (302). A thread of the zygote's (305) and an unrelated process (900) start
# too. Sample header lines end in a space.
PERF_SCRIPT = [
    "          python   300/300   PERF_RECORD_FORK(301:301):(300:300)",
    "          python   300/305   PERF_RECORD_FORK(300:305):(300:300)",
    "               6   301/301   PERF_RECORD_COMM exec: 6:301/301",
    "  engine-sandbox   301/301   PERF_RECORD_FORK(302:302):(301:301)",
    "            bash   800/800   PERF_RECORD_FORK(900:900):(800:800)",
    "               6   301/301 ",
    "\tffffffff81234567 clear_page_erms ([kernel.kallsyms])",
    "\tffffffff81234000 __x64_sys_execve ([kernel.kallsyms])",
    "\tffffffff81230000 do_syscall_64 ([kernel.kallsyms])",
    "\t            1f00 [unknown] (/memfd:engine-init (deleted))",
    "",
    "            init   302/302 ",
    "\t            2a10 [unknown] (/memfd:engine-init (deleted))",
    "\t            1f00 [unknown] (/memfd:engine-init (deleted))",
    "",
    "            init   302/302   PERF_RECORD_EXIT(302:302):(300:300)",
    "            bash   900/900 ",
    "\tffffffff81000000 do_idle ([kernel.kallsyms])",
]
ENGINE_INIT = "/memfd:engine-init (deleted)"


def frame(text: str) -> Frame:
    function, _, rest = text.partition(" (")
    file, _, line = rest.rstrip(")").rpartition(":")
    return Frame(function, file, int(line))


def kernel(symbol: str) -> Frame:
    return Frame(symbol, KERNEL_OBJECT, None)


def test_parse_line_splits_frames_count() -> None:
    parsed = parse_line(raw(ZYGOTE_LOOP, 12))
    assert parsed is not None
    frames, count = parsed
    assert frames[0] == Frame("_run_module_as_main", "<frozen runpy>", 198)
    assert frames[-1] == Frame("Zygote.serve", "engine/runtime/zygote.py", 92)
    assert len(frames) == 3
    assert count == 12


def test_parse_line_frame_without_line() -> None:
    parsed = parse_line("<module> (engine) 1")
    assert parsed is not None
    assert parsed[0] == [Frame("<module>", "engine", None)]


def test_parse_line_blank_is_none() -> None:
    assert parse_line("\n") is None


def test_parse_line_rejects_missing_count() -> None:
    with pytest.raises(ValueError, match="no sample count"):
        parse_line("main (engine/cli/main.py:120)")


def test_aggregate_daemon_samples_and_shares() -> None:
    profile = aggregate(DAEMON_LINES, pid=100)
    assert profile.samples == 20
    assert profile.pids == {100}
    assert profile.inclusive[frame(CREATE)] == 8
    assert profile.self_samples[frame(CREATE)] == 3
    assert profile.percent(profile.inclusive[frame(CREATE)]) == 40.0
    assert profile.self_samples[frame(SELECT)] == 10
    assert profile.inclusive[frame(WRITE)] == 2


def test_aggregate_drops_entry_frame_callers() -> None:
    profile = aggregate(DAEMON_LINES, pid=100)
    loop = frame("BaseEventLoop._run_once (asyncio/base_events.py:1845)")
    assert frame("main (engine/cli/main.py:120)") not in profile.inclusive
    assert frame("Thread.run (threading.py:971)") not in profile.inclusive
    assert profile.inclusive[loop] == 18
    assert profile.inclusive[frame("_worker (concurrent/futures/thread.py:69)")] == 2


def test_aggregate_zygote_keeps_serve_loop() -> None:
    profile = aggregate(ZYGOTE_LINES, pid=200)
    serve = frame("Zygote.serve (engine/runtime/zygote.py:92)")
    assert profile.samples == 10
    assert profile.pids == {200}
    assert frame("main (engine/runtime/zygote.py:234)") not in profile.inclusive
    assert profile.inclusive[serve] == 10
    assert profile.percent(profile.self_samples[frame(PREFORK)]) == 60.0


def test_aggregate_counts_recursion_once() -> None:
    recursive = "walk (engine/storage/trees.py:10)"
    profile = aggregate([raw([*CALLBACK, recursive, recursive], 4)], pid=100)
    assert profile.inclusive[frame(recursive)] == 4
    assert profile.self_samples[frame(recursive)] == 4


def test_top_tables_order_and_shares() -> None:
    profile = aggregate(DAEMON_LINES, pid=100)
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
    first = aggregate(ZYGOTE_LINES[:1], pid=200)
    second = aggregate(ZYGOTE_LINES[1:], pid=201)
    first.add(second)
    assert first.samples == 10
    assert first.pids == {200, 201}
    assert first.self_samples[frame(SELECT)] == 4
    assert first.self_samples[frame(PREFORK)] == 6


def test_perf_samples_reads_samples() -> None:
    samples = [
        item for item in perf_samples(PERF_SCRIPT) if isinstance(item, PerfSample)
    ]
    assert [(sample.comm, sample.pid, sample.tid) for sample in samples] == [
        ("6", 301, 301),
        ("init", 302, 302),
        ("bash", 900, 900),
    ]
    # Outermost first: perf prints the innermost frame first.
    assert samples[0].frames[0] == Frame("[unknown]", ENGINE_INIT, None)
    assert samples[0].frames[-1] == kernel("clear_page_erms")
    assert len(samples[0].frames) == 4
    assert samples[2].frames == [kernel("do_idle")]


def test_perf_samples_reads_process_forks() -> None:
    forks = [item for item in perf_samples(PERF_SCRIPT) if isinstance(item, tuple)]
    # The thread 305 of process 300 is no process fork.
    assert forks == [(301, 300), (302, 301), (900, 800)]


def test_perf_samples_last_sample_without_blank() -> None:
    items = list(perf_samples(["   true   310/310 ", "\tffffffff81 do_exit ([k])"]))
    assert items == [PerfSample("true", 310, 310, [Frame("do_exit", "[k]", None)])]


def test_perf_samples_rejects_invalid_header() -> None:
    with pytest.raises(ValueError, match="invalid perf script sample line"):
        list(perf_samples(["no pid here"]))


def test_perf_samples_rejects_invalid_frame() -> None:
    with pytest.raises(ValueError, match="invalid perf script frame line"):
        list(perf_samples(["   true   310/310 ", "\tnot a frame"]))


def test_kernel_stack_drops_user_callers() -> None:
    user = Frame("[unknown]", ENGINE_INIT, None)
    in_kernel = [user, kernel("do_syscall_64"), kernel("__x64_sys_mount")]
    assert kernel_stack(in_kernel) == in_kernel[1:]


def test_kernel_stack_keeps_user_leaf() -> None:
    caller = Frame("[unknown]", ENGINE_INIT, None)
    leaf = Frame("handle_amd", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", None)
    assert kernel_stack([caller, leaf]) == [leaf]


def test_kernel_stack_empty() -> None:
    assert kernel_stack([]) == []


def test_kernel_entry_names_system_call() -> None:
    entry = [kernel("entry_SYSCALL_64_after_hwframe"), kernel("do_syscall_64")]
    mount = [*entry, kernel("x64_sys_call"), kernel("__x64_sys_mount")]
    assert kernel_entry([*mount, kernel("path_mount")]) == "__x64_sys_mount"


def test_kernel_entry_inlined_system_call() -> None:
    stack = [kernel("do_syscall_64"), kernel("x64_sys_call"), kernel("do_group_exit")]
    assert kernel_entry(stack) == "do_group_exit"


def test_kernel_entry_page_fault() -> None:
    stack = [kernel("asm_exc_page_fault"), kernel("exc_page_fault")]
    assert kernel_entry(stack) == "asm_exc_page_fault"


def test_kernel_entry_user_space() -> None:
    leaf = Frame("handle_amd", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", None)
    assert kernel_entry([leaf]) == USER_SPACE
    assert kernel_entry([]) == USER_SPACE


def test_descendants_follow_forks() -> None:
    forks = dict(item for item in perf_samples(PERF_SCRIPT) if isinstance(item, tuple))
    assert descendants(forks, {300}) == {301, 302}


def test_descendants_of_several_roots() -> None:
    # 400 ran before perf started, so no fork event names its parent.
    parents = {401: 400, 402: 401, 301: 300, 900: 800}
    assert descendants(parents, {300, 400}) == {301, 401, 402}


def test_descendants_of_childless_root() -> None:
    assert descendants({301: 300}, {301}) == set()
