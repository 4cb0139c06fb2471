"""The CPU as one device: the host's RAM is its memory, so CPU-only hosts serve for real."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from node_agent.backends import BackendUnavailable, DeviceFigures


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def read_meminfo(text: str) -> tuple[int, int]:
    """(total_mb, available_mb) from /proc/meminfo's text."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0])  # kB
    if "MemTotal" not in fields:
        raise BackendUnavailable("cpu backend: /proc/meminfo has no MemTotal")
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return fields["MemTotal"] // 1024, available // 1024


class CpuBackend:
    name = "cpu"

    def __init__(self, meminfo_path: Path = Path("/proc/meminfo")) -> None:
        self._meminfo_path = meminfo_path
        self._name = f"{_cpu_name()} ({os.cpu_count()} threads)"
        self.devices()  # fail at start-up, not at the first request

    def devices(self) -> list[DeviceFigures]:
        try:
            total, available = read_meminfo(self._meminfo_path.read_text())
        except OSError as exc:
            raise BackendUnavailable(f"cpu backend: cannot read {self._meminfo_path}: "
                                     f"{exc.strerror}") from exc
        # Hide GPUs from a CPU llama-server so a CUDA build cannot wander onto one.
        return [DeviceFigures("cpu", self._name, total, total - available, available,
                              pin_env=(("CUDA_VISIBLE_DEVICES", ""),))]

    def close(self) -> None:
        return None
