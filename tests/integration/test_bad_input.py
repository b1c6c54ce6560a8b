"""Invalid requests to the Engine: each is rejected with a message naming the field.

After every rejected sandbox request the test checks that no sandbox
directory, cgroup or sandbox record was left behind, and after every rejected
exec that no process was started. The engine must still create a working
sandbox after the whole module has run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from engine.core.models import SandboxSpec
from engine.core.validation import MAX_EXEC_BYTES
from engine.errors import EngineError, InvalidArgument, NotFound

if TYPE_CHECKING:
    from conftest import EngineRunner

MISSING_ID = "sb-000000000000"


@pytest.fixture
def unchanged(engine: EngineRunner) -> Iterator[None]:
    """Check that the test leaves no sandbox directory, cgroup or record behind."""
    engine.settle_pool()
    dirs = engine.sandbox_dirs()
    groups = engine.cgroup_names()
    records = len(engine.call(engine.engine.list_sandboxes()))
    yield
    engine.settle_pool()
    assert engine.sandbox_dirs() == dirs
    assert engine.cgroup_names() == groups
    assert len(engine.call(engine.engine.list_sandboxes())) == records


# Unknown sandbox ids.


def _unknown_id_calls(engine: EngineRunner) -> dict[str, Callable[[], Any]]:
    core = engine.engine
    return {
        "get_sandbox": lambda: engine.call(core.get_sandbox(MISSING_ID)),
        "terminate_sandbox": lambda: engine.call(core.terminate_sandbox(MISSING_ID)),
        "update_ttl": lambda: engine.call(core.update_ttl(MISSING_ID, 60)),
        "stats": lambda: engine.call(core.stats(MISSING_ID)),
        "exec": lambda: engine.call(core.exec(MISSING_ID, ["true"])),
        "list_processes": lambda: engine.call(core.list_processes(MISSING_ID)),
        "wait": lambda: engine.call(core.wait(MISSING_ID, 2)),
        "kill": lambda: engine.call(core.kill(MISSING_ID, 2)),
    }


@pytest.mark.parametrize(
    "method",
    [
        "get_sandbox",
        "terminate_sandbox",
        "update_ttl",
        "stats",
        "exec",
        "list_processes",
        "wait",
        "kill",
    ],
)
@pytest.mark.usefixtures("unchanged")
def test_unknown_sandbox_not_found(engine: EngineRunner, method: str) -> None:
    with pytest.raises(NotFound, match=MISSING_ID):
        _unknown_id_calls(engine)[method]()


def test_unknown_process_not_found(engine: EngineRunner, sandbox_id: str) -> None:
    with pytest.raises(NotFound, match="process 99999"):
        engine.wait(sandbox_id, 99999)


# Sandbox specs.

BAD_SPECS = {
    "negative-cpu": ({"cpu": -1.0}, "cpu"),
    "zero-cpu": ({"cpu": 0.0}, "cpu"),
    "nan-cpu": ({"cpu": math.nan}, "cpu"),
    "memory-below-8": ({"memory_mib": 4}, "memory"),
    "pids-zero": ({"pids": 0}, "pids"),
    "nofile-too-low": ({"nofile": 2}, "nofile"),
    "workdir-relative": ({"workdir": "tmp"}, "workdir"),
    "workdir-nul": ({"workdir": "/tmp/a\0b"}, "workdir"),
    "nan-ttl": ({"ttl": math.nan}, "ttl"),
    "infinite-ttl": ({"ttl": math.inf}, "ttl"),
    "ttl-past-year-9999": ({"ttl": 1e300}, "ttl"),
    "env-name-with-equals": ({"env": {"A=B": "value"}}, "env"),
    "env-value-nul": ({"env": {"NAME": "a\0b"}}, "env"),
    "name-with-slash": ({"name": "a/b"}, "name"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
@pytest.mark.usefixtures("unchanged")
def test_bad_spec_rejected(engine: EngineRunner, case: str) -> None:
    fields, field_name = BAD_SPECS[case]
    with pytest.raises(InvalidArgument, match=field_name):
        engine.create(**fields)


@pytest.mark.usefixtures("unchanged")
def test_unknown_image_not_found(engine: EngineRunner) -> None:
    with pytest.raises(NotFound, match="engine-no-such-image"):
        engine.call(
            engine.engine.create_sandbox(SandboxSpec(image="engine-no-such-image"))
        )


# Exec requests.

BAD_EXECS: dict[str, tuple[list[str], dict[str, Any], str]] = {
    "empty-argv": ([], {}, "argv"),
    "empty-program": ([""], {}, r"argv\[0\]"),
    "nul-in-argv": (["echo", "a\0b"], {}, r"argv\[1\]"),
    "argv-over-limit": (["echo", "x" * MAX_EXEC_BYTES], {}, "argv and env"),
    "env-over-limit": (
        ["true"],
        {"env": {"BIG": "x" * MAX_EXEC_BYTES}},
        "argv and env",
    ),
    "env-name-with-equals": (["true"], {"env": {"A=B": "x"}}, "env"),
    "relative-cwd": (["true"], {"cwd": "tmp"}, "cwd"),
    "nul-in-cwd": (["true"], {"cwd": "/tmp\0"}, "cwd"),
    "negative-timeout": (["true"], {"timeout": -1.0}, "timeout"),
    "nan-timeout": (["true"], {"timeout": math.nan}, "timeout"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXECS))
def test_bad_exec_rejected(engine: EngineRunner, sandbox_id: str, case: str) -> None:
    argv, options, field_name = BAD_EXECS[case]
    tasks = engine.host_pids(sandbox_id)
    with pytest.raises(InvalidArgument, match=field_name):
        engine.exec(sandbox_id, argv, **options)
    processes = engine.call(engine.engine.list_processes(sandbox_id))
    assert processes == []
    assert engine.host_pids(sandbox_id) == tasks


def test_long_cwd_error_cut(engine: EngineRunner, sandbox_id: str) -> None:
    cwd = "/" + "a" * 100_000
    with pytest.raises(EngineError) as raised:
        engine.exec(sandbox_id, ["true"], cwd=cwd)
    message = str(raised.value)
    assert len(message) <= 300
    assert message.endswith("...")


def test_bad_signal_rejected(engine: EngineRunner, sandbox_id: str) -> None:
    process = engine.exec(sandbox_id, ["sleep", "30"])
    with pytest.raises(InvalidArgument, match="signal"):
        engine.call(engine.engine.kill(sandbox_id, process.pid, 0))
    with pytest.raises(InvalidArgument, match="signal"):
        engine.call(engine.engine.kill(sandbox_id, process.pid, 1000))
    engine.call(engine.engine.kill(sandbox_id, process.pid))


def test_bad_ttl_update_rejected(engine: EngineRunner, sandbox_id: str) -> None:
    with pytest.raises(InvalidArgument, match="ttl"):
        engine.call(engine.engine.update_ttl(sandbox_id, math.nan))
    with pytest.raises(InvalidArgument, match="ttl"):
        engine.call(engine.engine.update_ttl(sandbox_id, 1e300))
    info = engine.call(engine.engine.get_sandbox(sandbox_id))
    assert info.spec.ttl == SandboxSpec().ttl


def test_engine_works_after_bad_input(
    engine: EngineRunner, new_sandbox: Callable[..., str]
) -> None:
    sandbox_id = new_sandbox()
    result = engine.run(sandbox_id, ["echo", "alive"])
    assert result.exit_code == 0
    assert result.stdout == b"alive\n"


@pytest.mark.parametrize("workdir", ["/etc/passwd", "/etc/hostname/below"])
def test_workdir_not_directory_rejected(engine: EngineRunner, workdir: str) -> None:
    # The sandbox fails after it took a preforked supervisor, whose cgroup is
    # then removed and replaced by the pool, so only groups outside the pool
    # must be unchanged.
    engine.settle_pool()
    dirs = engine.sandbox_dirs()
    groups = engine.cgroup_names() - engine.pool_names()
    with pytest.raises(InvalidArgument, match="is not a directory") as raised:
        engine.create(workdir=workdir)
    assert workdir in str(raised.value)
    engine.settle_pool()
    assert engine.sandbox_dirs() == dirs
    assert engine.cgroup_names() - engine.pool_names() == groups


def test_workdir_over_path_max_rejected(engine: EngineRunner, unchanged: None) -> None:
    with pytest.raises(InvalidArgument, match="workdir is 4098 bytes"):
        engine.create(workdir="/a" * 2049)


def test_deep_workdir_created(engine: EngineRunner) -> None:
    workdir = "/root" + "/d" * 1500
    sandbox_id = engine.create(workdir=workdir)
    try:
        result = engine.run(sandbox_id, ["pwd"])
        assert result.stdout.decode().strip() == workdir
    finally:
        engine.terminate(sandbox_id)


@pytest.mark.parametrize("workdir", ["/proc/self/fd/3", "/proc", "/dev/shm", "/sys/x"])
def test_workdir_in_kernel_dirs_rejected(engine: EngineRunner, workdir: str) -> None:
    with pytest.raises(InvalidArgument, match="is in /proc, /dev or /sys"):
        engine.create(workdir=workdir)
