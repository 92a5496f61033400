"""What machine a build ran on, so that its timings can be compared with another's.

The same build, code unchanged, took twice as long on one 2-core machine as on another
(docs/measurements.md): a wall time means little without the machine it came from.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

# the packages whose versions decide what a build produces and how fast
PACKAGES = ("torch", "onnx", "onnxruntime", "onnxruntime-qnn", "aimet-onnx", "numpy")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def memory_bytes(meminfo: str | None = None) -> int | None:
    """Total memory from /proc/meminfo (None where there is none)."""
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            return None
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), which a container may set below
    the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def describe_host() -> dict:
    """The machine and software a build ran on (the manifest's ``host``)."""
    return {
        "cpu": cpu_model(),
        "cpus": usable_cpus(),
        "memory_bytes": memory_bytes(),
        "python": platform.python_version(),
        "packages": package_versions(),
    }


def host_line(host: dict) -> str:
    """One line for a report: ``AMD EPYC, 2 CPUs, 24.6 GB``."""
    memory = f", {host['memory_bytes'] / 1e9:.1f} GB" if host.get("memory_bytes") else ""
    return f"{host['cpu']}, {host['cpus']} CPUs{memory}"
