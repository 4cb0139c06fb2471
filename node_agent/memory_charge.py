"""What a model instance is charged against a device's budget: measured once known, else
estimated. Read the model's files once (read_model_memory), then ask charge() per load.

    memory = read_model_memory(model)                  # at start-up: GGUF header, mmproj
    need = memory.need(["gpu:0"])                      # MemoryBreakdown, pure
    c = charge(memory, ("gpu:0",), footprints)         # measured figure wins when recorded
    c.per_device_mb, c.host_mb, c.source, c.estimated_mb, c.measured_mb, c.error_pct
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from node_agent.config import ModelConfig
from node_agent.footprints import Footprints
from rolemesh.memory_breakdown import MemoryBreakdown
from rolemesh.memory_estimate import GGUFFacts, read_gguf_facts
from rolemesh.placement_memory import estimate_need, projector_size

MemorySource = Literal["measured", "estimated"]


@dataclass(frozen=True)
class ModelMemory:
    """A model's config with the figures read from its files, for pure estimates later."""

    model: ModelConfig
    facts: GGUFFacts
    projector_bytes: int

    def need(self, devices: Sequence[str], split: Sequence[float] | None = None
             ) -> MemoryBreakdown:
        return estimate_need(self.model, self.facts, devices, split,
                             projector_bytes=self.projector_bytes)


def read_model_memory(model: ModelConfig) -> ModelMemory:
    """Reads the GGUF header and the projector's; raises NotAGGUFFile or OSError."""
    return ModelMemory(model, read_gguf_facts(model.path), projector_size(model))


@dataclass(frozen=True)
class Charge:
    per_device_mb: dict[str, int]
    host_mb: int
    source: MemorySource
    estimated_mb: int  # the estimate's total over the group's devices
    measured_mb: int | None

    @property
    def charged_mb(self) -> int:
        return sum(self.per_device_mb.values())

    @property
    def error_pct(self) -> float | None:
        """How far the estimate was from the measurement (positive: it was too large)."""
        if self.measured_mb is None or self.measured_mb == 0:
            return None
        return round((self.estimated_mb - self.measured_mb) / self.measured_mb * 100, 1)


def charge(memory: ModelMemory, devices: Sequence[str], footprints: Footprints | None,
           split: Sequence[float] | None = None) -> Charge:
    """The figure to charge: the measured one for this model as configured, where one was
    recorded after a load on a group of this size, else the estimate. A measurement per
    device (cuda, from NVML) is charged as measured; a single total (cpu RSS) goes to the
    device of a one-device group."""
    group = tuple(devices)
    need = memory.need(group, split)
    estimated = need.per_device_mb
    measured_total = footprints.lookup(memory.model, group) if footprints else None
    per_device = footprints.lookup_per_device(memory.model, group) if footprints else None
    if per_device and set(per_device) == set(group):
        return Charge(per_device, need.host_mb, "measured", sum(estimated.values()),
                      sum(per_device.values()))
    if measured_total is not None and len(group) == 1:
        return Charge({group[0]: measured_total}, need.host_mb, "measured",
                      sum(estimated.values()), measured_total)
    return Charge(estimated, need.host_mb, "estimated", sum(estimated.values()),
                  measured_total)
