"""Describe the machine a benchmark ran on: CPU, memory, kernel, cgroups, Python."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from engine.runtime import cgroups


def _cpuinfo_field(name: str) -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, separator, value = line.partition(":")
        if separator and key.strip() == name:
            return value.strip()
    return ""


def _memory_total_bytes() -> int:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            # /proc/meminfo reports kB, meaning KiB.
            return int(line.split()[1]) * 1024
    return 0


def _os_release() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.partition("=")[2].strip().strip('"')
    return ""


def cgroup_mode() -> str:
    """Return the cgroup mode: "v2 (unified)", "v1 hybrid (...)" or "v1 (legacy)"."""
    mounts = cgroups.read_cgroup_mounts("/proc/self/mountinfo")
    v1 = [mount for mount in mounts if mount.fstype == "cgroup"]
    v2 = [mount for mount in mounts if mount.fstype == "cgroup2"]
    if v2 and not v1:
        return "v2 (unified)"
    if v1 and v2:
        return "v1 hybrid (v1 controllers plus a v2 mount)"
    if v1:
        return "v1 (legacy)"
    return "none mounted"


def own_cgroup_dirs() -> list[str]:
    """Return the directory of this process's cgroup in every mounted hierarchy."""
    entries = cgroups.read_proc_cgroup("/proc/self/cgroup")
    mounts = cgroups.read_cgroup_mounts("/proc/self/mountinfo")
    parents = set(cgroups.own_v1_dirs(entries, mounts).values())
    unified = cgroups.own_v2_dir(entries, mounts)
    if unified is not None:
        parents.add(unified)
    return sorted(parents)


def describe_machine() -> dict[str, Any]:
    """Return the facts that a benchmark table needs beside its figures."""
    memory = _memory_total_bytes()
    hypervisor = "hypervisor" in _cpuinfo_field("flags").split()
    return {
        "cpu_model": _cpuinfo_field("model name") or platform.processor(),
        "cpu_count": os.cpu_count() or 0,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "virtual_machine": hypervisor,
        "memory_bytes": memory,
        "memory_gib": round(memory / 1024**3, 1),
        "kernel": platform.release(),
        "os": _os_release(),
        "cgroup_mode": cgroup_mode(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "euid": os.geteuid(),
    }


def machine_summary(machine: dict[str, Any]) -> str:
    """Return the machine description as one line of Markdown-friendly text."""
    kind = ", virtual machine" if machine.get("virtual_machine") else ""
    return (
        f"{machine['cpu_model']}, {machine['cpus_usable']} cores{kind},"
        f" {machine['memory_gib']} GiB RAM; {machine['os']}, kernel"
        f" {machine['kernel']}; cgroup {machine['cgroup_mode']};"
        f" {machine['python']}"
    )
