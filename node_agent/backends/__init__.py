"""Device backends: where a node's devices and their memory figures come from.

Each backend answers `devices()` with figures read from a real source; a backend that has
no real source on this host raises `BackendUnavailable` at start-up instead of pretending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class BackendUnavailable(RuntimeError):
    """This backend cannot work on this host; the message says why and what to do."""


@dataclass(frozen=True)
class DeviceFigures:
    device_id: str  # "gpu:0", "cpu"
    name: str
    memory_total_mb: int | None
    memory_used_mb: int | None
    memory_free_mb: int | None
    utilization_pct: float | None = None
    # What the llama-server child of this device gets in its environment to be pinned to it.
    pin_env: tuple[tuple[str, str], ...] = ()


class DeviceBackend(Protocol):
    name: str

    def devices(self) -> list[DeviceFigures]:
        """Every device of this backend with its figures now."""
        ...

    def close(self) -> None: ...
