"""Pick the backend named in the config (or the best one for `auto`)."""

from __future__ import annotations

from node_agent.backends import BackendUnavailable, DeviceBackend
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
