"""Host RAM: what the host has, and what one llama-server (with its children) holds in it."""

from __future__ import annotations

from pathlib import Path

import psutil

from node_agent.backends.cpu import read_meminfo

_MB = 1024 * 1024


def host_memory(meminfo_path: Path = Path("/proc/meminfo")) -> tuple[int, int]:
    """(total_mb, available_mb) of this host; available is the kernel's MemAvailable
    estimate (free plus what it can reclaim without swapping, page cache included)."""
    try:
        return read_meminfo(meminfo_path.read_text())
    except OSError:
        memory = psutil.virtual_memory()
        return memory.total // _MB, memory.available // _MB


def process_tree_pids(pid: int) -> list[int]:
    """The process and all its descendants (empty when it has gone)."""
    try:
        root = psutil.Process(pid)
        return [root.pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.Error:
        return []


def process_memory_mb(pid: int) -> int | None:
    """Resident memory of a process tree in MB (RSS: mapped weights that are resident
    count too), None when the process is gone or cannot be read."""
    total, seen = 0, False
    for member in process_tree_pids(pid):
        try:
            total += psutil.Process(member).memory_info().rss
            seen = True
        except psutil.Error:
            continue  # a child that exited between listing and reading
    return -(-total // _MB) if seen else None
