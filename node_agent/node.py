"""This host as the agent sees it: its devices' slots, its models, and the choice between them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from node_agent.backends import DeviceBackend, DeviceFigures
from node_agent.config import ModelConfig, NodeAgentConfig
from node_agent.slot import DeviceSlot
from rolemesh.api import DeviceStatus, ModelStatus, NodeInventory
from rolemesh.decision import Decision, DeviceView, ModelCost, Outcome, Policy, choose
from rolemesh.errors import (
    BadRequest,
    DeviceBusy,
    ModelDoesNotFit,
    ModelNotFound,
    ModelNotReady,
    UnknownDevice,
)
from rolemesh.memory_estimate import NotAGGUFFile, estimate_memory_mb, read_gguf_facts

_MB = 1024 * 1024
log = structlog.get_logger("node_agent.node")
FIGURES_TTL_S = 1.0
DEFAULT_LOAD_S = 5.0  # what we assume a load costs before we have measured one


class ModelFileError(Exception):
    pass


@dataclass(frozen=True)
class ModelFacts:
    file_size_mb: int
    memory_need_mb: int


def check_model_files(config: NodeAgentConfig) -> dict[str, ModelFacts]:
    """Every model's file must exist and be a GGUF; returns each one's size and memory need."""
    facts: dict[str, ModelFacts] = {}
    problems = []
    for i, model in enumerate(config.models):
        path = Path(model.path)
        where = f"models.{i}.path ({model.model_id})"
        if not path.is_file():
            problems.append(f"{where}: {path} does not exist or is not a file")
            continue
        try:
            gguf = read_gguf_facts(path)
        except NotAGGUFFile as exc:
            problems.append(f"{where}: {exc}")
            continue
        need = estimate_memory_mb(gguf, model.ctx_size, model.parallel)
        facts[model.model_id] = ModelFacts(-(-gguf.file_size_bytes // _MB), need)
    if problems:
        raise ModelFileError("\n".join(problems))
    return facts


class Node:
    def __init__(self, config: NodeAgentConfig, backend: DeviceBackend,
                 slots: dict[str, DeviceSlot], facts: dict[str, ModelFacts],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.backend = backend
        self.slots = slots
        self.facts = facts
        self._clock = clock
        self._policy = Policy(memory_safety_margin=config.memory_safety_margin)
        self._figures: dict[str, DeviceFigures] = {}
        self._figures_at = -FIGURES_TTL_S
        self._seq = 0

    # -- figures -----------------------------------------------------------------------------

    def figures(self) -> dict[str, DeviceFigures]:
        now = self._clock()
        if now - self._figures_at >= FIGURES_TTL_S:
            self._figures_at = now
            try:
                fresh = self.backend.devices()
            except Exception as exc:  # a driver hiccup must not fail requests
                if not self._figures:
                    raise
                log.warning("backend.read_failed", backend=self.backend.name, error=str(exc))
            else:
                self._figures = {d.device_id: d for d in fresh if d.device_id in self.slots}
        return self._figures

    def device_status(self, device_id: str) -> DeviceStatus:
        fig = self.figures()[device_id]
        snap = self.slots[device_id].snapshot()
        return DeviceStatus(
            device_id=device_id, name=fig.name, backend=self.backend.name,
            memory_total_mb=fig.memory_total_mb, memory_used_mb=fig.memory_used_mb,
            memory_free_mb=fig.memory_free_mb, utilization_pct=fig.utilization_pct,
            slot_state=snap.state, loaded_model=snap.loaded_model, in_flight=snap.in_flight,
            pending=snap.pending, pending_limit=snap.pending_limit, parallel=snap.parallel,
            last_error=snap.last_error)

    def model_statuses(self) -> list[ModelStatus]:
        out = []
        for m in self.config.models:
            facts = self.facts[m.model_id]
            loads = [s.load_seconds[m.model_id] for s in self.slots.values()
                     if m.model_id in s.load_seconds]
            out.append(ModelStatus(
                model_id=m.model_id, roles=list(m.roles), file_size_mb=facts.file_size_mb,
                memory_need_mb=facts.memory_need_mb, ctx_size=m.ctx_size,
                last_load_s=round(max(loads), 4) if loads else None,
                recent_requests=sum(s.recent_requests(m.model_id) for s in self.slots.values())))
        return out

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def inventory(self) -> NodeInventory:
        return NodeInventory(node_id=self.config.node_id, url=self.config.url,
                             backend=self.backend.name, seq=self.next_seq(),
                             devices=[self.device_status(d) for d in self.slots],
                             models=self.model_statuses())

    # -- choosing a device --------------------------------------------------------------------

    def _view(self, device_id: str) -> DeviceView:
        fig = self.figures()[device_id]
        slot = self.slots[device_id]
        snap = slot.snapshot()
        servable = {m.model_id: ModelCost(self.facts[m.model_id].memory_need_mb,
                                          slot.load_seconds.get(m.model_id, DEFAULT_LOAD_S))
                    for m in self.config.models}
        free = fig.memory_free_mb
        return DeviceView(
            node_id=self.config.node_id, device_id=device_id, servable=servable,
            memory_total_mb=fig.memory_total_mb, memory_free_mb=free,
            loaded_model=snap.loaded_model, slot_state=snap.state, in_flight=snap.in_flight,
            pending=snap.pending, pending_limit=snap.pending_limit,
            recent_requests={m: slot.recent_requests(m) for m in servable})

    def _named_by_dispatcher(self, name: str, device_id: str | None, model_id: str | None
                             ) -> tuple[DeviceSlot, ModelConfig] | None:
        """The dispatcher already chose device and model (on the whole cluster's figures):
        take them without deciding again; the slot's queue still says yes or busy."""
        if device_id is None or model_id is None:
            return None
        slot = self.slots.get(device_id)
        model = self.config.model(model_id)
        if slot is None or model is None:
            return None  # decide() explains what is wrong
        if name != model_id and name not in model.roles and self.config.models_for(name):
            return None  # the name is ours and means other models: decide() says so
        return slot, model

    def decide(self, name: str, device_id: str | None = None,
               model_id: str | None = None) -> Decision:
        models = self.config.models_for(name)
        if not models and model_id is not None and self.config.model(model_id) is not None:
            # The dispatcher resolved a name only it knows (an alias) to one of our models.
            models = [self.config.model(model_id)]  # type: ignore[list-item]
        if not models:
            known = sorted({m.model_id for m in self.config.models}
                           | {r for m in self.config.models for r in m.roles})
            raise ModelNotFound(f"model or role {name!r} is not served by node "
                                f"{self.config.node_id!r}; it serves: {', '.join(known)}")
        if model_id is not None:
            models = [m for m in models if m.model_id == model_id]
            if not models:
                raise BadRequest(f"X-RoleMesh-Model {model_id!r} is not a model of {name!r}")
        if device_id is not None:
            if device_id not in self.slots:
                raise UnknownDevice(f"X-RoleMesh-Device {device_id!r} is not a device of node "
                                    f"{self.config.node_id!r} ({', '.join(self.slots)})")
            device_ids = [device_id]
        else:
            device_ids = list(self.slots)
        views = [self._view(d) for d in device_ids]
        return choose([m.model_id for m in models], views, self._policy)

    def pick(self, name: str, device_id: str | None = None,
             model_id: str | None = None) -> tuple[DeviceSlot, ModelConfig]:
        named = self._named_by_dispatcher(name, device_id, model_id)
        if named is not None:
            return named
        decision = self.decide(name, device_id, model_id)
        if decision.winner is not None:
            model = self.config.model(decision.winner.model_id)
            assert model is not None
            return self.slots[decision.winner.device_id], model
        match decision.outcome:
            case Outcome.FITS_NOWHERE:
                raise ModelDoesNotFit(f"{decision.explain()} (after the "
                                      f"{self.config.memory_safety_margin:g} safety margin)")
            case Outcome.ALL_BUSY:
                raise DeviceBusy(decision.explain(),
                                 retry_after_s=decision.retry_after_s or 1.0)
            case _:
                raise ModelNotReady(decision.explain())
