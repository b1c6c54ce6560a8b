"""Find out which isolation layers a system applied, by running a probe inside it.

The probe is a POSIX sh script that prints the process's namespace ids, its
seccomp mode, the file system type of its root and its network interfaces.
``parse_probe`` compares the namespace ids with the harness's own, so a layer
is reported as on only when the probe saw it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

NAMESPACES = ("user", "mnt", "pid", "uts", "ipc", "net", "cgroup")

# Only sh builtins, readlink and the files of /proc, so it runs in every root
# file system the benchmarks build.
PROBE_SCRIPT = """\
for n in user mnt pid uts ipc net cgroup; do
  echo "ns $n $(readlink /proc/self/ns/$n)"
done
while read -r key value rest; do
  case $key in Seccomp:|NoNewPrivs:) echo "status $key $value";; esac
done < /proc/self/status
while read -r device point type rest; do
  [ "$point" = / ] && echo "root $type"
done < /proc/self/mounts
while read -r line; do
  case $line in *:*) echo "if ${line%%:*}";; esac
done < /proc/net/dev
"""

PROBE_ARGV = ["/bin/sh", "-c", PROBE_SCRIPT]


@dataclass(frozen=True)
class Layers:
    """Isolation layers of one system.

    Namespace, seccomp, root and network fields come from the probe.
    ``cgroup_limits`` (empty for none) and ``cgroup_note`` come from the
    configuration the harness passed, because a process cannot read its own
    limits through a cgroup namespace.
    """

    namespaces: dict[str, bool]
    seccomp: bool
    no_new_privs: bool
    root_fs_type: str
    interfaces: tuple[str, ...]
    cgroup_limits: str
    cgroup_note: str = ""

    @property
    def overlay_root(self) -> bool:
        return self.root_fs_type == "overlay"

    @property
    def loopback_only(self) -> bool:
        return self.interfaces == ("lo",)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["interfaces"] = list(self.interfaces)
        data["overlay_root"] = self.overlay_root
        data["loopback_only"] = self.loopback_only
        return data


def host_namespace_ids() -> dict[str, str]:
    """Return the namespace ids of this process, such as {"net": "net:[4026531840]"}."""
    return {name: os.readlink(f"/proc/self/ns/{name}") for name in NAMESPACES}


def parse_probe(output: str, cgroup_limits: str, cgroup_note: str = "") -> Layers:
    """Turn the probe's output into Layers, comparing namespaces with this process's.

    Raises ValueError when the output lacks a namespace line, which means the
    probe did not run to the end.
    """
    host = host_namespace_ids()
    namespaces: dict[str, bool] = {}
    status: dict[str, str] = {}
    root_type = ""
    interfaces: list[str] = []
    for line in output.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "ns":
            name, _, identifier = rest.partition(" ")
            namespaces[name] = bool(identifier) and identifier != host.get(name)
        elif kind == "status":
            key, _, value = rest.partition(" ")
            status[key.rstrip(":")] = value.strip()
        elif kind == "root":
            # /proc/self/mounts lists stacked mounts in order, so the last
            # one on "/" is the process's root.
            root_type = rest.strip()
        elif kind == "if":
            interfaces.append(rest.strip())
    missing = [name for name in NAMESPACES if name not in namespaces]
    if missing:
        raise ValueError(
            f"the isolation probe printed no line for namespaces {missing}; output:"
            f" {output!r}"
        )
    return Layers(
        namespaces=namespaces,
        seccomp=status.get("Seccomp", "0") != "0",
        no_new_privs=status.get("NoNewPrivs", "0") == "1",
        root_fs_type=root_type,
        interfaces=tuple(sorted(interfaces)),
        cgroup_limits=cgroup_limits,
        cgroup_note=cgroup_note,
    )
