"""Pid files of our llama-server children, so a restarted agent can reap what it left.

A pid alone could have been reused by an unrelated process since; the file also keeps
the process's start time (from /proc), and only a process with both matching is killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import structlog

log = structlog.get_logger("node_agent.pidfiles")


def process_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 overall: starttime


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class PidFiles:
    def __init__(self, state_dir: Path, node_id: str) -> None:
        self.directory = state_dir / "pids"
        self.prefix = _safe(node_id) + "--"

    def _path(self, device_id: str) -> Path:
        return self.directory / f"{self.prefix}{_safe(device_id)}.pid"

    def write(self, device_id: str, pid: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ticks = process_start_ticks(pid)
        self._path(device_id).write_text(f"{pid} {ticks if ticks is not None else -1}\n")

    def remove(self, device_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(device_id).unlink()

    def reap_orphans(self, grace_s: float = 3.0) -> list[int]:
        """Kill children a previous run of this node's agent left behind; return their pids."""
        if not self.directory.is_dir():
            return []
        reaped = []
        for path in sorted(self.directory.glob(self.prefix + "*.pid")):
            try:
                pid_text, ticks_text = path.read_text().split()
                pid, ticks = int(pid_text), int(ticks_text)
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            if ticks >= 0 and process_start_ticks(pid) == ticks:
                log.warning("llama.orphan_reaped", pid=pid, pidfile=str(path))
                _terminate_group(pid, grace_s)
                reaped.append(pid)
            path.unlink(missing_ok=True)
        return reaped


def _terminate_group(pid: int, grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if process_start_ticks(pid) is None:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
