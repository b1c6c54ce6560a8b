"""Summaries, Markdown tables, result files and the results section of the docs."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from benchmarks.isolation import NAMESPACES, Layers
from benchmarks.machine import machine_summary
from benchmarks.suite import (
    COLD_START,
    EXEC,
    EXEC_BURST,
    SECONDS,
    THROUGHPUT,
    Case,
    throughput_system,
)

# Targets, each checked against medians of the same run.
# Cold start through gRPC, loopback only: at most this many times bubblewrap's.
COLD_START_TARGET_RATIO = 1.5
# Cold start with bridged networking: at most the ratio above times
# bubblewrap's median plus this many milliseconds.
NETWORK_COLD_START_EXTRA_MS = 2.0
# Exec round trip: at most this many times the bare fork+exec baseline's.
EXEC_TARGET_RATIO = 2.0
# Create plus terminate through gRPC with THROUGHPUT_TARGET_CLIENTS clients.
THROUGHPUT_TARGET_PER_SECOND = 200.0
THROUGHPUT_TARGET_CLIENTS = 4
# Systems the latency tables divide by, and the ones the targets name, by key.
BASELINE_SYSTEM = "posix-spawn"
FORK_EXEC_SYSTEM = "fork-exec"
BWRAP_SYSTEM = "bwrap"
RUNC_SYSTEM = "runc"
GRPC_SYSTEM = "engine-grpc"
GRPC_NETWORK_SYSTEM = "engine-grpc-net"
GRPC_RUN_SYSTEM = "engine-grpc-run"
# The SDK's default Client, whose SandboxService calls use the daemon's
# direct socket instead of gRPC.
DIRECT_SYSTEM = "engine-direct"
DIRECT_RUN_SYSTEM = "engine-direct-run"
# A Health Check RPC on the daemon: the cost of a unary gRPC call alone.
GRPC_HEALTH_SYSTEM = "engine-grpc-health"
EMBEDDED_SYSTEM = "engine-embedded"
TITLES = {
    COLD_START: "Cold start: create a sandbox and run `true` to its exit"
    " (ms, lower is better)",
    EXEC: "Exec round trip of `true` in a running sandbox (ms, lower is better)",
    EXEC_BURST: "Exec round trip, back to back: mean of {burst} execs in a row"
    " per sample (ms per exec, lower is better)",
    THROUGHPUT: "Create plus terminate throughput through the SDK's Client on the"
    " direct socket (sandboxes/s, higher is better)",
}
RESULTS_START = "<!-- results:start -->"
RESULTS_END = "<!-- results:end -->"
_NAMESPACE_TITLES = {
    "user": "user",
    "mnt": "mount",
    "pid": "pid",
    "uts": "uts",
    "ipc": "ipc",
    "net": "net",
    "cgroup": "cgroup",
}


def percentile(values: list[float], fraction: float) -> float:
    """Return the ``fraction`` quantile, interpolating linearly between ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def summarize(case: Case) -> dict[str, float] | None:
    """Return min, median, p95 and max of a case, in ms for latencies."""
    if not case.samples:
        return None
    scale = 1000.0 if case.unit == SECONDS else 1.0
    values = [value * scale for value in case.samples]
    return {
        "min": min(values),
        "median": statistics.median(values),
        "p95": percentile(values, 0.95),
        "max": max(values),
    }


def _find(cases: list[Case], measurement: str, system: str) -> Case | None:
    for case in cases:
        if case.measurement == measurement and case.system == system:
            return case
    return None


def _median(cases: list[Case], measurement: str, system: str) -> float | None:
    case = _find(cases, measurement, system)
    summary = summarize(case) if case is not None else None
    return summary["median"] if summary else None


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference == 0:
        return "n/a"
    return f"{value / reference:.2f}x"


def _cell(text: str, limit: int = 200) -> str:
    """Return the first line of ``text``, shortened and escaped for a table cell."""
    lines = text.strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) > limit:
        line = line[: limit - 1] + "…"
    return line.replace("|", "\\|")


def _status(case: Case) -> str:
    if case.unavailable:
        return f"not available: {_cell(case.unavailable)}"
    if case.error and not case.samples:
        return f"not available: {_cell(case.error)}"
    if case.error:
        return f"stopped early, {len(case.samples)} samples: {_cell(case.error)}"
    return ""


def missing_layers(layers: Layers) -> list[str]:
    """Name the layers that ``layers`` lacks, in table order."""
    missing = [
        f"{_NAMESPACE_TITLES[name]} ns"
        for name in NAMESPACES
        if not layers.namespaces[name]
    ]
    if not layers.cgroup_limits:
        missing.append("cgroup limits")
    if not layers.seccomp:
        missing.append("seccomp")
    if not layers.overlay_root:
        missing.append("overlay root")
    if not layers.loopback_only:
        missing.append("loopback-only network")
    return missing


def _layer_note(layers: Layers | str | None) -> str:
    if isinstance(layers, str):
        return layers
    if isinstance(layers, Layers):
        missing = missing_layers(layers)
        if not missing:
            return "every layer on"
        if len(missing) == len(NAMESPACES) + 4:
            return "no isolation"
        return "no " + ", ".join(missing)
    return "layers not probed"


def latency_table(
    cases: list[Case], measurement: str, layers: dict[str, Layers | str]
) -> str:
    """Return the Markdown table of a latency measurement, with its ratio columns."""
    baseline = _median(cases, measurement, BASELINE_SYSTEM)
    runc = _median(cases, measurement, RUNC_SYSTEM)
    rows = [
        "| system | min | median | p95 | ÷ posix_spawn | ÷ runc | isolation layers |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        if case.measurement != measurement:
            continue
        summary = summarize(case)
        note = _layer_note(layers.get(case.system))
        status = _status(case)
        if status:
            note = f"{note}; {status}" if note and summary else status
        if summary is None:
            rows.append(f"| {case.label} | - | - | - | - | - | {note} |")
            continue
        rows.append(
            f"| {case.label} | {_number(summary['min'])} | {_number(summary['median'])}"
            f" | {_number(summary['p95'])} | {_ratio(summary['median'], baseline)}"
            f" | {_ratio(summary['median'], runc)} | {note} |"
        )
    return "\n".join(rows)


def throughput_table(cases: list[Case]) -> str:
    """Return the Markdown table of the throughput measurement."""
    rows = [
        "| clients | min | median | p95 | ÷ 1 client | median create+terminate (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    single_case = _find(cases, THROUGHPUT, throughput_system(1))
    single = summarize(single_case) if single_case is not None else None
    for case in cases:
        if case.measurement != THROUGHPUT:
            continue
        summary = summarize(case)
        if summary is None:
            rows.append(f"| {case.label} | - | - | - | - | {_status(case)} |")
            continue
        cycles = case.details.get("cycle_seconds", [])
        cycle = _number(statistics.median(cycles) * 1000) if cycles else "-"
        ratio = _ratio(summary["median"], single["median"] if single else None)
        status = _status(case)
        label = f"{case.label} ({status})" if status else case.label
        rows.append(
            f"| {label} | {_number(summary['min'])} | {_number(summary['median'])}"
            f" | {_number(summary['p95'])} | {ratio} | {cycle} |"
        )
    return "\n".join(rows)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def layers_table(labels: dict[str, str], layers: dict[str, Layers | str]) -> str:
    """Return the Markdown table of the isolation layers each system had on."""
    header = [f"{_NAMESPACE_TITLES[name]} ns" for name in NAMESPACES]
    header += ["cgroup limits", "seccomp", "overlay root", "loopback-only net"]
    rows = [
        "| system | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for system, label in labels.items():
        found = layers.get(system)
        if not isinstance(found, Layers):
            reason = _cell(found or "not probed")
            cells = " | ".join(["-"] * len(header))
            rows.append(f"| {label} ({reason}) | {cells} |")
            continue
        cells = [_yes(found.namespaces[name]) for name in NAMESPACES]
        limits = found.cgroup_limits or "none"
        if found.cgroup_note:
            limits += f" ({found.cgroup_note})"
        cells += [
            limits,
            _yes(found.seccomp),
            _yes(found.overlay_root) + f" ({found.root_fs_type})",
            _yes(found.loopback_only) + f" ({', '.join(found.interfaces)})",
        ]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _target(
    name: str, value: float | None, limit: float | None, unit: str, at_most: bool
) -> dict[str, Any]:
    met = None
    if value is not None and limit is not None:
        met = value <= limit if at_most else value >= limit
    return {"target": name, "value": value, "limit": limit, "unit": unit, "met": met}


def targets(cases: list[Case]) -> list[dict[str, Any]]:
    """Check the stated targets against this run's medians."""
    bwrap = _median(cases, COLD_START, BWRAP_SYSTEM)
    fork_exec = _median(cases, EXEC, FORK_EXEC_SYSTEM)
    ratio = COLD_START_TARGET_RATIO
    results = [
        _target(
            f"median cold start through gRPC, loopback only ≤ {ratio:g}x"
            " bubblewrap's median",
            _median(cases, COLD_START, GRPC_SYSTEM),
            None if bwrap is None else ratio * bwrap,
            "ms",
            at_most=True,
        ),
        _target(
            f"median cold start through gRPC, bridged network ≤ {ratio:g}x"
            f" bubblewrap's median + {NETWORK_COLD_START_EXTRA_MS:g} ms",
            _median(cases, COLD_START, GRPC_NETWORK_SYSTEM),
            None if bwrap is None else ratio * bwrap + NETWORK_COLD_START_EXTRA_MS,
            "ms",
            at_most=True,
        ),
    ]
    # The gRPC-only exec rows stay in the tables, for reference: the SDK
    # sends its calls on the direct socket.
    for system, name in (
        (DIRECT_SYSTEM, "SDK Exec stream, direct socket"),
        (DIRECT_RUN_SYSTEM, "SDK Run, direct socket"),
        (EMBEDDED_SYSTEM, "embedded"),
    ):
        results.append(
            _target(
                f"median exec round trip ({name}) ≤ {EXEC_TARGET_RATIO:g}x the"
                " median of os.fork + os.execv + waitpid",
                _median(cases, EXEC, system),
                None if fork_exec is None else EXEC_TARGET_RATIO * fork_exec,
                "ms",
                at_most=True,
            )
        )
    # The same comparison on the back-to-back table, where no exec follows a
    # pause, so neither side pays for waking idle CPUs and processes.
    burst_fork_exec = _median(cases, EXEC_BURST, FORK_EXEC_SYSTEM)
    for system, name in (
        (DIRECT_SYSTEM, "SDK Exec stream, direct socket"),
        (DIRECT_RUN_SYSTEM, "SDK Run, direct socket"),
    ):
        results.append(
            _target(
                f"median exec round trip back to back ({name}) ≤"
                f" {EXEC_TARGET_RATIO:g}x the back-to-back median of os.fork +"
                " os.execv + waitpid",
                _median(cases, EXEC_BURST, system),
                None
                if burst_fork_exec is None
                else EXEC_TARGET_RATIO * burst_fork_exec,
                "ms",
                at_most=True,
            )
        )
    clients = THROUGHPUT_TARGET_CLIENTS
    results.append(
        _target(
            f"median create plus terminate throughput with {clients} clients,"
            f" after a refill pause, ≥ {THROUGHPUT_TARGET_PER_SECOND:g} sandboxes/s",
            _median(cases, THROUGHPUT, throughput_system(clients)),
            THROUGHPUT_TARGET_PER_SECOND,
            "sandboxes/s",
            at_most=False,
        )
    )
    results.append(
        _target(
            f"median create plus terminate throughput with {clients} clients,"
            f" sustained with no pause, ≥ {THROUGHPUT_TARGET_PER_SECOND:g}"
            " sandboxes/s",
            _median(cases, THROUGHPUT, throughput_system(clients, sustained=True)),
            THROUGHPUT_TARGET_PER_SECOND,
            "sandboxes/s",
            at_most=False,
        )
    )
    return results


def _target_line(target: dict[str, Any]) -> str:
    if target["met"] is None:
        return f"- {target['target']}: not measured in this run."
    verdict = "met" if target["met"] else "**missed**"
    unit = target["unit"]
    return (
        f"- {target['target']}: {verdict} ({_number(target['value'])} {unit}"
        f" against {_number(target['limit'])} {unit})."
    )


def render_markdown(run: dict[str, Any], cases: list[Case]) -> str:
    """Return the results section: machine, tables, isolation layers and targets."""
    layers: dict[str, Layers | str] = run["layers_objects"]
    labels: dict[str, str] = run["system_labels"]
    options = run["options"]
    lines = [
        f"Run of {run['started_at']}: {options['iterations']} recorded rounds after"
        f" {options['warmup']} warm-up rounds. Each round samples every row once,"
        f" in a shuffled order (seed {options['seed']}), with a"
        f" {options['pause'] * 1000:g} ms pause after each sample.",
        "",
        f"Command: `{run['command']}`.",
        "",
        f"Machine: {machine_summary(run['machine'])}.",
        "",
        f"One-minute load average: {run['load_average']['before']:.1f} before the"
        f" run, {run['load_average']['after']:.1f} after it.",
        "",
        "Tools: " + "; ".join(run["tool_versions"]) + ".",
        "",
        f"### {TITLES[COLD_START]}",
        "",
        latency_table(cases, COLD_START, layers),
        "",
        f"### {TITLES[EXEC]}",
        "",
        latency_table(cases, EXEC, layers),
        "",
        f"### {TITLES[EXEC_BURST].format(burst=options['burst'])}",
        "",
        latency_table(cases, EXEC_BURST, layers),
        "",
        f"### {TITLES[THROUGHPUT]}",
        "",
        f"Each sample: every client runs {options['throughput_cycles']} Create"
        " plus Terminate pairs, all clients starting together.",
        "",
        throughput_table(cases),
        "",
        "### Isolation layers, as probed inside each system",
        "",
        layers_table(labels, layers),
        "",
        "### Targets",
        "",
        *[_target_line(target) for target in run["targets"]],
    ]
    if run["cleanup_problems"]:
        lines += ["", "Cleanup problems: " + "; ".join(run["cleanup_problems"]) + "."]
    return "\n".join(lines) + "\n"


def results_json(run: dict[str, Any], cases: list[Case], markdown: str) -> str:
    """Return the raw samples, summaries, machine and table as JSON text."""
    data = {key: value for key, value in run.items() if key != "layers_objects"}
    data["layers"] = {
        system: found.to_json() if isinstance(found, Layers) else {"error": found}
        for system, found in run["layers_objects"].items()
    }
    data["cases"] = [
        {
            "measurement": case.measurement,
            "system": case.system,
            "label": case.label,
            "unit": case.unit,
            "samples": case.samples,
            "details": case.details,
            "summary": summarize(case),
            "summary_unit": "ms" if case.unit == SECONDS else "sandboxes/s",
            "unavailable": case.unavailable,
            "error": case.error,
        }
        for case in cases
    ]
    data["markdown"] = markdown
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_results(
    directory: Path, stamp: str, json_text: str, markdown: str
) -> tuple[Path, Path]:
    """Write <stamp>.json and <stamp>.md into ``directory`` and return both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stamp}.json"
    markdown_path = directory / f"{stamp}.md"
    json_path.write_text(json_text)
    markdown_path.write_text(markdown)
    return json_path, markdown_path


def replace_section(
    path: Path, start: str, end: str, markdown: str, missing: str | None = None
) -> None:
    """Replace the text between the markers ``start`` and ``end`` of ``path``.

    A page without both markers first gets ``missing`` appended, which must
    contain them; with ``missing`` None it raises ValueError instead. A page
    that does not exist starts as a bare "# Benchmarks" heading.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start not in text or end not in text:
        if missing is None:
            raise ValueError(
                f"{path} has no {start} ... {end} section; add both markers where"
                " the results belong"
            )
        text = text.rstrip("\n") + "\n" + missing
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    replacement = f"{start}\n{markdown}{end}"
    path.write_text(pattern.sub(lambda _: replacement, text, count=1))


def update_docs(path: Path, markdown: str) -> None:
    """Replace the text between the results markers of ``path`` with ``markdown``.

    Raises ValueError when the file lacks either marker.
    """
    replace_section(path, RESULTS_START, RESULTS_END, markdown)
