"""NVIDIA GPUs through NVML (nvidia-ml-py), behind a small seam tests can fake."""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from typing import Any, Protocol

from node_agent.backends import BackendUnavailable, DeviceFigures

_MB = 1024 * 1024


class Nvml(Protocol):
    """The part of NVML the backend uses; `PynvmlAdapter` is the real one."""

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def memory_bytes(self, index: int) -> tuple[int, int, int]:
        """(total, used, free) in bytes."""
        ...
    def utilization_pct(self, index: int) -> float | None: ...
    def process_memory_bytes(self, index: int) -> dict[int, int]:
        """{pid: bytes used on this GPU} for each compute process running on it."""
        ...


class PynvmlAdapter:
    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
            raise BackendUnavailable("cuda backend: nvidia-ml-py is not installed") from exc
        self._nvml: Any = pynvml

    def init(self) -> None:
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            raise BackendUnavailable(
                f"cuda backend: NVML could not start ({exc}); is the NVIDIA driver "
                "installed and is libnvidia-ml.so on this host?") from exc

    def shutdown(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()

    def device_count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def _handle(self, index: int) -> Any:
        return self._nvml.nvmlDeviceGetHandleByIndex(index)

    def name(self, index: int) -> str:
        name = self._nvml.nvmlDeviceGetName(self._handle(index))
        return name.decode() if isinstance(name, bytes) else str(name)

    def memory_bytes(self, index: int) -> tuple[int, int, int]:
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle(index))
        return int(mem.total), int(mem.used), int(mem.free)

    def utilization_pct(self, index: int) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle(index)).gpu)
        except self._nvml.NVMLError:
            return None  # some GPUs (and MIG slices) do not report it

    def process_memory_bytes(self, index: int) -> dict[int, int]:
        processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle(index))
        # usedGpuMemory is None where the driver does not say (some containers, Windows WDDM)
        return {int(p.pid): int(p.usedGpuMemory) for p in processes
                if getattr(p, "usedGpuMemory", None) is not None}


class CudaBackend:
    name = "cuda"

    def __init__(self, nvml: Nvml | None = None) -> None:
        self._nvml = nvml if nvml is not None else PynvmlAdapter()
        self._nvml.init()
        self._count = self._nvml.device_count()
        if self._count == 0:
            self._nvml.shutdown()
            raise BackendUnavailable("cuda backend: NVML started but sees no GPU")
        self._names = [self._nvml.name(i) for i in range(self._count)]

    def devices(self) -> list[DeviceFigures]:
        out = []
        for i in range(self._count):
            total, used, free = self._nvml.memory_bytes(i)
            out.append(DeviceFigures(
                f"gpu:{i}", self._names[i], total // _MB, used // _MB, free // _MB,
                self._nvml.utilization_pct(i),
                pin_env=(("CUDA_VISIBLE_DEVICES", str(i)),)))
        return out

    def process_memory_mb(self, pids: Collection[int]) -> dict[str, int]:
        """What these processes (one llama-server and its children) use on each GPU, in MB;
        a GPU they do not use is left out."""
        wanted, out = set(pids), {}
        for i in range(self._count):
            used = sum(b for pid, b in self._nvml.process_memory_bytes(i).items()
                       if pid in wanted)
            if used:
                out[f"gpu:{i}"] = -(-used // _MB)
        return out

    def close(self) -> None:
        self._nvml.shutdown()
