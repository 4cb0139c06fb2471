"""What each model needs on each placement of this node, estimated or measured: the figures
the scheduler charges and the inventory reports.

One owner for the node's memory figures: the models' estimates per placement (llama.cpp's
rules, rolemesh.placement_memory, from the GGUF tensor table read once at start), the
operator's `memory_mb` when given (it wins), and what an instance was measured to take after
its load (node_agent.footprints, kept in state_dir across restarts), which replaces the
estimate from then on. Host RAM is checked for a placement's host-side part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from node_agent.config import ModelConfig
from node_agent.footprints import Footprints
from node_agent.memory_charge import Charge, ModelMemory, charge
from rolemesh.memory_breakdown import MemoryBreakdown, host_fit
from rolemesh.residency import split_need

log = structlog.get_logger("node_agent.memory_needs")


@dataclass(frozen=True)
class Need:
    per_device_mb: dict[str, int]
    host_mb: int
    source: str  # "estimated", "measured" or "configured"
    estimated_mb: int
    measured_mb: int | None
    host_refusal: str | None = None  # why the host-side part cannot fit, when it cannot
    host_note: str | None = None  # e.g. weights paged from disk


class MemoryNeeds:
    def __init__(self, memories: dict[str, ModelMemory], footprints: Footprints | None) -> None:
        self._memories = memories
        self._footprints = footprints
        self._cache: dict[tuple[str, tuple[str, ...]], Charge] = {}
        self._breakdowns: dict[tuple[str, tuple[str, ...]], MemoryBreakdown] = {}

    def breakdown(self, model: ModelConfig, devices: Sequence[str]) -> MemoryBreakdown | None:
        memory = self._memories.get(model.model_id)
        if memory is None:
            return None
        key = (model.model_id, tuple(devices))
        if key not in self._breakdowns:
            self._breakdowns[key] = memory.need(tuple(devices), model.split)
        return self._breakdowns[key]

    def need(self, model: ModelConfig, devices: Sequence[str],
             host_available_mb: int | None = None) -> Need:
        group = tuple(devices)
        if model.memory_mb is not None or model.model_id not in self._memories:
            stated = model.memory_mb or 0
            return Need(split_need(stated, group, model.split), 0, "configured", stated, None)
        key = (model.model_id, group)
        c = self._cache.get(key)
        if c is None:
            c = self._cache[key] = charge(self._memories[model.model_id], group,
                                          self._footprints, model.split)
        refusal = note = None
        if "cpu" not in group and c.host_mb:
            b = self.breakdown(model, group)
            unpageable = c.host_mb - (b.host_pageable_mb if b is not None else 0)
            fit = host_fit(c.host_mb, host_available_mb, model.allow_disk_paging,
                           unpageable_mb=max(0, unpageable))
            if not fit.ok:
                refusal = fit.note
            elif fit.paging:
                note = fit.note
        return Need(dict(c.per_device_mb), c.host_mb, c.source, c.estimated_mb,
                    c.measured_mb, refusal, note)

    def measured(self, model: ModelConfig, devices: Sequence[str], total_mb: int,
                 per_device_mb: dict[str, int] | None) -> None:
        """An instance was measured after its load: keep it, and charge it from now on."""
        if self._footprints is None or model.memory_mb is not None:
            return
        group = tuple(devices)
        self._footprints.record(model, total_mb, group, per_device_mb)
        self._cache.pop((model.model_id, group), None)
        log.info("memory.measured", model=model.model_id, devices=list(group),
                 measured_mb=total_mb, per_device_mb=per_device_mb)
