"""How many threads a command should use: the cores this process may run on and that are free.

Measured on a busy 2-core machine: conversions took 16-37 s with torch's
default thread count (every core, whatever the load) and 5-9 s with one
thread, so the default counts only cores that are allowed (CPU affinity,
cgroup CPU quota) and not already busy (the 1-minute load average).
"""
from __future__ import annotations

import math
import os

__all__ = ["allowed_cpus", "default_threads"]


def allowed_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup (v1 or v2) CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.ceil(quota))) if quota else max(1, n)


def default_threads() -> int:
    """Allowed cores minus those kept busy by other work (1-minute load average), at least 1."""
    n = allowed_cpus()
    try:
        busy = int(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    return max(1, n - busy)


def _cgroup_quota() -> float | None:
    """CPUs granted by the cgroup CPU controller, or None when unlimited or unknown."""
    paths = {"": "/"}
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as fh:
            for line in fh:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(","):
                    paths[c] = path
    except (OSError, ValueError):
        pass
    root = "/sys/fs/cgroup"
    v2 = [os.path.join(root, paths[""].lstrip("/"), "cpu.max"), os.path.join(root, "cpu.max")]
    v1 = [os.path.join(root, d, paths.get("cpu", "/").lstrip("/")) for d in ("cpu", "cpu,cpuacct")]
    v1 += [os.path.join(root, d) for d in ("cpu", "cpu,cpuacct")]
    for path in v2:
        fields = _read(path)
        if fields:
            return None if fields[0] == "max" else _ratio(fields[0], fields[1] if len(fields) > 1 else "100000")
    for d in v1:
        q, p = _read(os.path.join(d, "cpu.cfs_quota_us")), _read(os.path.join(d, "cpu.cfs_period_us"))
        if q and p:
            return None if q[0].startswith("-") else _ratio(q[0], p[0])
    return None


def _read(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().split()
    except (OSError, UnicodeDecodeError):
        return []


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
