"""A placement's memory need as data: per device of its group, in host RAM; the host-RAM fit.

Built by rolemesh.placement_memory.estimate_need; read by the decision (per_device_mb,
host_mb, host_fit) and shown by `rolemesh check-fit` and /v1/route.
"""

from __future__ import annotations

from dataclasses import dataclass

from rolemesh.memory_estimate import MIB


def _mib(nbytes: int) -> int:
    return -(-nbytes // MIB)


@dataclass(frozen=True)
class MemoryPart:
    """What one device (or the host) holds for the model: bytes, and MiB rounded up."""

    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    compute_buffer_bytes: int = 0
    projector_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_cache_bytes + self.compute_buffer_bytes
                + self.projector_bytes)

    @property
    def weights_mb(self) -> int:
        return _mib(self.weights_bytes)

    @property
    def kv_cache_mb(self) -> int:
        return _mib(self.kv_cache_bytes)

    @property
    def compute_buffer_mb(self) -> int:
        return _mib(self.compute_buffer_bytes)

    @property
    def projector_mb(self) -> int:
        return _mib(self.projector_bytes)

    @property
    def total_mb(self) -> int:
        return _mib(self.total_bytes)


@dataclass(frozen=True)
class MemoryBreakdown:
    """The need of one placement: per device of the group, and in host RAM.

    On a CPU-only placement (device "cpu") the device *is* host RAM: everything is in
    per_device["cpu"] and `host` is empty, so nothing is counted twice. On GPUs, `host`
    is what stays in system RAM (token embedding, CPU layers, experts kept on the CPU,
    their KV cache and the host compute/output buffers).
    """

    per_device: dict[str, MemoryPart]
    host: MemoryPart
    # Of the host part, the weights llama.cpp maps from the file (mmap): the kernel can page
    # them from disk when RAM is short, which is what allow_disk_paging accepts.
    host_pageable_mb: int = 0
    notes: tuple[str, ...] = ()

    @property
    def per_device_mb(self) -> dict[str, int]:
        return {device: part.total_mb for device, part in self.per_device.items()}

    @property
    def host_mb(self) -> int:
        return self.host.total_mb

    @property
    def total_mb(self) -> int:
        return sum(self.per_device_mb.values()) + self.host_mb

    def _sum(self, component: str, with_host: bool = True) -> int:
        parts = [*self.per_device.values(), *([self.host] if with_host else [])]
        return _mib(sum(getattr(p, component) for p in parts))

    @property
    def weights_gpu_mb(self) -> int:
        """Weights on the group's devices (on a CPU-only placement: on the cpu device)."""
        return self._sum("weights_bytes", with_host=False)

    @property
    def weights_host_mb(self) -> int:
        return self.host.weights_mb

    @property
    def kv_cache_mb(self) -> int:
        return self._sum("kv_cache_bytes")

    @property
    def compute_buffer_mb(self) -> int:
        return self._sum("compute_buffer_bytes")

    @property
    def projector_mb(self) -> int:
        return self._sum("projector_bytes")

    def as_dict(self) -> dict[str, object]:
        """JSON-ready MB figures (for /v1/route and --json): per place, per component."""
        def part(p: MemoryPart) -> dict[str, int]:
            return {"weights_mb": p.weights_mb, "kv_cache_mb": p.kv_cache_mb,
                    "compute_buffer_mb": p.compute_buffer_mb, "projector_mb": p.projector_mb,
                    "total_mb": p.total_mb}
        return {"per_device": {d: part(p) for d, p in self.per_device.items()},
                "host": part(self.host), "host_pageable_mb": self.host_pageable_mb,
                "notes": list(self.notes)}


@dataclass(frozen=True)
class HostFit:
    ok: bool
    paging: bool  # fits only because mmap'd weights will be paged from disk
    note: str


def host_fit(host_need_mb: int, host_available_mb: int | None, allow_disk_paging: bool,
             unpageable_mb: int = 0) -> HostFit:
    """Whether a placement's host-RAM part fits what the host has available now.

    Beyond what is available, only weights mapped from the file can live on disk (the
    kernel pages them in as they are read): so with allow_disk_paging the placement still
    fits when the part that cannot page (KV cache and buffers kept on the host,
    `unpageable_mb`) fits. An unknown figure (None) does not refuse.
    """
    if host_available_mb is None:
        return HostFit(True, False, "host memory unknown: not checked")
    if host_need_mb <= host_available_mb:
        return HostFit(True, False, f"host RAM: needs {host_need_mb} MB of "
                                    f"{host_available_mb} MB available")
    short = host_need_mb - host_available_mb
    if allow_disk_paging and unpageable_mb <= host_available_mb:
        return HostFit(True, True, f"host RAM: needs {host_need_mb} MB, {host_available_mb} MB "
                                   f"available: {short} MB of weights will be paged from disk "
                                   "through mmap (allow_disk_paging; slow)")
    why = ("even with disk paging the KV cache and buffers kept on the host need "
           f"{unpageable_mb} MB" if allow_disk_paging
           else "set allow_disk_paging: true to page the weights from disk")
    return HostFit(False, False, f"host RAM: needs {host_need_mb} MB, only "
                                 f"{host_available_mb} MB available ({why})")
