"""CPU time and memory of running processes, read from /proc (Linux), no dependency.

CPU time comes from each thread's `/proc/PID/task/TID/schedstat` (nanoseconds on CPU)
when the kernel keeps it, which resolves the tens of microseconds a proxied request costs;
`/proc/PID/stat`'s utime + stime (10 ms ticks) is the fallback. A process "tree" adds its
descendants, for servers that fork workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = _read(str(task / "children"))
        if text:
            out += [int(c) for c in text.split()]
    return out


def tree(pid: int) -> list[int]:
    """pid and every live descendant."""
    seen = [pid]
    i = 0
    while i < len(seen):
        for child in _children(seen[i]):
            if child not in seen:
                seen.append(child)
        i += 1
    return seen


def user_system_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds from /proc/PID/stat: 10 ms ticks, dead threads included."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return 0.0, 0.0
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[11]) * _TICK_S, int(fields[12]) * _TICK_S


def _stat_cpu_s(pid: int) -> float:
    return sum(user_system_s(pid))


def _schedstat_cpu_s(pid: int) -> float | None:
    total = 0
    any_value = False
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = _read(str(task / "schedstat"))
        if not text:
            continue
        value = int(text.split()[0])
        total += value
        any_value = any_value or value > 0
    return total / 1e9 if any_value else None


def cpu_seconds(pid: int) -> float:
    precise = _schedstat_cpu_s(pid)
    return precise if precise is not None else _stat_cpu_s(pid)


def rss_mb(pid: int) -> float:
    text = _read(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class CpuMeter:
    """CPU seconds used by named process trees between start() and stop()."""

    pids: dict[str, int]
    include_children: bool = True

    def _sample(self) -> tuple[dict[str, float], dict[str, float]]:
        total: dict[str, float] = {}
        system: dict[str, float] = {}
        for name, pid in self.pids.items():
            pids: Iterable[int] = tree(pid) if self.include_children else [pid]
            total[name] = system[name] = 0.0
            for p in pids:
                total[name] += cpu_seconds(p)
                system[name] += user_system_s(p)[1]
        return total, system

    def start(self) -> None:
        self._before, self._before_sys = self._sample()

    def stop(self) -> dict[str, float]:
        after, after_sys = self._sample()
        self.system_s = {name: max(0.0, after_sys[name] - self._before_sys.get(name, 0.0))
                         for name in after_sys}
        return {name: max(0.0, after[name] - self._before.get(name, 0.0)) for name in after}
