"""Pick the backend named in the config (or the best one for `auto`)."""

from __future__ import annotations

from node_agent.backends import BackendUnavailable, DeviceBackend, DeviceFigures
from node_agent.backends.cpu import CpuBackend
from node_agent.backends.cuda import CudaBackend
from node_agent.backends.other import MetalBackend, RocmBackend, unsupported


def select_backend(name: str) -> DeviceBackend:
    if name == "auto":
        try:
            return CudaBackend()
        except BackendUnavailable:
            return CpuBackend()
    if name == "cuda":
        return CudaBackend()
    if name == "cpu":
        return CpuBackend()
    if name == "rocm":
        return RocmBackend()
    if name == "metal":
        return MetalBackend()
    raise unsupported(name)


class WithCpu:
    """A GPU backend plus the host's CPU as one more device (`cpu_device: true`).

    The CPU then takes what the GPUs cannot hold (a pinned model starts there when they are
    full, and moves back to a GPU as soon as one has room)."""

    def __init__(self, gpus: DeviceBackend, cpu: DeviceBackend) -> None:
        self.name = gpus.name
        self._gpus = gpus
        self._cpu = cpu

    def devices(self) -> list[DeviceFigures]:
        return [*self._gpus.devices(), *self._cpu.devices()]

    def close(self) -> None:
        self._gpus.close()
        self._cpu.close()


def with_cpu_device(backend: DeviceBackend, cpu: DeviceBackend | None = None) -> DeviceBackend:
    if any(d.device_id == "cpu" for d in backend.devices()):
        return backend
    return WithCpu(backend, cpu or CpuBackend())
