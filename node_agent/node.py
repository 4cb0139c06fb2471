"""This host as the agent sees it: its devices, its models, its scheduler, its own choice."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from node_agent.backends import DeviceBackend, DeviceFigures
from node_agent.backends.host import host_memory, process_memory_mb, process_tree_pids
from node_agent.config import ModelConfig, NodeAgentConfig
from node_agent.footprints import Footprints
from node_agent.instance import ModelInstance
from node_agent.memory_charge import ModelMemory, read_model_memory
from node_agent.memory_needs import MemoryNeeds
from node_agent.scheduler import DEFAULT_LOAD_S, Budget, NodeScheduler
from rolemesh.api import (
    DeviceStatus,
    InstanceState,
    InstanceStatus,
    MemorySource,
    ModelStatus,
    NodeInventory,
    StopRecord,
)
from rolemesh.decision import (
    Decision,
    DeviceView,
    ModelCost,
    Outcome,
    ResidentView,
    choose,
)
from rolemesh.errors import (
    DeviceBusy,
    ModelDoesNotFit,
    ModelNotFound,
    ModelNotReady,
    UnknownDevice,
)
from rolemesh.memory_estimate import NotAGGUFFile
from rolemesh.service_time import service_s

_MB = 1024 * 1024
log = structlog.get_logger("node_agent.node")
FIGURES_TTL_S = 1.0
MEMORY_FREE_WAIT_S = 15.0  # the longest a load waits for a stopped process's memory


class ModelFileError(Exception):
    pass


@dataclass(frozen=True)
class ModelFacts:
    file_size_mb: int
    memory_need_mb: int
    memory: ModelMemory | None = None  # the GGUF's tensor table, for estimates per placement


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
            memory = read_model_memory(model)
        except (NotAGGUFFile, OSError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        gguf = memory.facts
        need = model.memory_mb or sum(memory.need(model.placement or ("gpu:0",),
                                                  model.split).per_device_mb.values())
        facts[model.model_id] = ModelFacts(-(-gguf.file_size_bytes // _MB), need, memory)
    problems += config.projector_problems()
    if problems:
        raise ModelFileError("\n".join(problems))
    return facts


class Node:
    """This host: its devices' figures, its scheduler, its inventory and its own decision."""

    def __init__(self, config: NodeAgentConfig, backend: DeviceBackend,
                 device_ids: list[str], facts: dict[str, ModelFacts],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.backend = backend
        self.device_ids = device_ids
        self.facts = facts
        self._clock = clock
        self._policy = config.cost_model.policy(
            memory_safety_margin=config.memory_safety_margin)
        self._figures: dict[str, DeviceFigures] = {}
        self._figures_at = -FIGURES_TTL_S
        self._seq = 0
        self.scheduler: NodeScheduler  # set by attach(): it needs our budgets
        self.memory = MemoryNeeds({m: f.memory for m, f in facts.items() if f.memory},
                                  Footprints(config.state_dir))
        self._host: tuple[int | None, int | None] = (None, None)
        self._host_at = -FIGURES_TTL_S

    def attach(self, scheduler: NodeScheduler) -> None:
        self.scheduler = scheduler

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
                self._figures = {d.device_id: d for d in fresh if d.device_id in self.device_ids}
        return self._figures

    def host(self) -> tuple[int | None, int | None]:
        """Host RAM (total, available) in MB; (None, None) when it cannot be read."""
        now = self._clock()
        if now - self._host_at >= FIGURES_TTL_S:
            self._host_at = now
            try:
                total, available = host_memory()
                self._host = (total, available)
            except (OSError, ValueError) as exc:
                log.warning("host.memory_unreadable", error=str(exc))
        return self._host

    def need_of(self, model: ModelConfig, devices: tuple[str, ...]
                ) -> tuple[dict[str, int], str | None]:
        """What `model` is charged on `devices`, and why host RAM refuses it (or None)."""
        need = self.memory.need(model, devices, self.host()[1])
        return need.per_device_mb, need.host_refusal

    def best_placement(self, model: ModelConfig) -> tuple[str, ...]:
        return model.placement or (self.device_ids[0],)

    def measure(self, inst: ModelInstance) -> None:
        """What a freshly loaded instance really took: kept, and charged from now on."""
        proc = inst.process
        if proc is None or inst.model.memory_mb is not None:
            return
        per_device: dict[str, int] | None = None
        if inst.devices == ("cpu",):
            total = process_memory_mb(proc.pid)
            if total is None:
                return
            per_device = {"cpu": total}
        else:
            by_gpu = getattr(self.backend, "process_memory_mb", None)
            if by_gpu is None:
                return  # this backend cannot tell what one process holds
            per_device = by_gpu(process_tree_pids(proc.pid))
            if not per_device:
                return
            total = sum(per_device.values())
        self.memory.measured(inst.model, inst.devices, total, per_device)
        estimated = inst.estimated_mb
        for d in inst.devices:
            share, was = per_device.get(d), inst.charged_mb.get(d)
            if share and was is not None:
                self.scheduler.emit("instance.measured", {
                    "model": inst.model_id, "devices": [d], "measured_mb": share,
                    "error_ratio": round((was - share) / share, 4)})
        log.info("memory.estimate_error", model=inst.model_id, estimated_mb=estimated,
                 measured_mb=total)
        inst.measured_mb = total
        inst.charged_mb = {d: per_device.get(d, inst.charged_mb.get(d, 0))
                           for d in inst.devices}

    async def wait_for_memory(self, inst: ModelInstance) -> None:
        """Before a load: wait (bounded) until the backend shows room for it, so a load
        right after a stop does not fail for memory the stopped process is still freeing."""
        deadline = self._clock() + MEMORY_FREE_WAIT_S
        while True:
            self._figures_at = -FIGURES_TTL_S  # read fresh figures
            figures = self.figures()
            short = {d: (free, need) for d, need in inst.charged_mb.items()
                     if d != "cpu" and d in figures
                     and (free := figures[d].memory_free_mb) is not None and free < need}
            if not short:
                return
            if self._clock() >= deadline:
                log.warning("memory.not_freed", model=inst.model_id, waited_s=MEMORY_FREE_WAIT_S,
                            free_vs_need_mb=short)
                return
            await asyncio.sleep(0.25)

    def budgets(self) -> dict[str, Budget]:
        figures = self.figures()
        return {d: Budget(figures[d].memory_total_mb, figures[d].memory_free_mb)
                for d in self.device_ids if d in figures}

    def instance_status(self, inst: ModelInstance, device_id: str) -> InstanceStatus:
        sched = self.scheduler
        return InstanceStatus(
            model_id=inst.model_id, devices=list(inst.devices), state=inst.state,
            in_flight=inst.in_flight, queued=sched.queued_for(inst.key),
            parallel=inst.model.parallel, memory_charged_mb=inst.charged_mb.get(device_id, 0),
            memory_source=(MemorySource.MEASURED if inst.measured_mb is not None
                           else MemorySource.ESTIMATED),
            memory_estimated_mb=inst.estimated_mb, memory_measured_mb=inst.measured_mb,
            pinned=inst.model.pinned,
            idle_s=(round(self._clock() - inst.idle_since, 3)
                    if inst.idle_since is not None else None),
            ttl_left_s=_round(sched.ttl_left(inst)),
            last_load_s=_round(inst.last_load_s), restarts=inst.restarts,
            draining_for=inst.draining_for or (inst.stop_reason.value
                                               if inst.stop_reason else None),
            last_error=inst.last_error)

    def failed_statuses(self, device_id: str) -> list[InstanceStatus]:
        """A model that failed there and is backing off shows as a `failed` instance (its
        failures or restarts so far, its error), charged nothing, until it starts again."""
        out = []
        for model_id, devices, count, error, _left in self.scheduler.failed_on(device_id):
            model = self.config.model(model_id)
            out.append(InstanceStatus(
                model_id=model_id, devices=list(devices), state=InstanceState.FAILED,
                parallel=model.parallel if model else 1, pinned=bool(model and model.pinned),
                restarts=count, last_error=error))
        return out

    def device_status(self, device_id: str) -> DeviceStatus:
        fig = self.figures()[device_id]
        sched = self.scheduler
        in_flight, pending = sched.queue_of(device_id)
        return DeviceStatus(
            device_id=device_id, name=fig.name, backend=self.backend.name,
            memory_total_mb=fig.memory_total_mb, memory_used_mb=fig.memory_used_mb,
            memory_free_mb=fig.memory_free_mb, utilization_pct=fig.utilization_pct,
            memory_charged_mb=sched.charged_on(device_id),
            instances=[*(self.instance_status(i, device_id)
                         for i in sched.instances_on(device_id)),
                       *self.failed_statuses(device_id)],
            in_flight=in_flight, pending=pending,
            pending_limit=self.config.max_pending_requests_per_device,
            mode=sched.held.get(device_id), failed_models=sched.failed_models(device_id),
            last_error=sched.failure_of(device_id))

    def model_statuses(self) -> list[ModelStatus]:
        sched = self.scheduler
        out = []
        host_available = self.host()[1]
        for m in self.config.models:
            facts = self.facts[m.model_id]
            load = sched.load_seconds.get(m.model_id)
            placement = self.best_placement(m)
            need = self.memory.need(m, placement, host_available)
            b = self.memory.breakdown(m, placement) if need.source == "estimated" else None
            breakdown = None if b is None else {
                "weights_gpu_mb": b.weights_gpu_mb, "kv_cache_mb": b.kv_cache_mb,
                "compute_buffer_mb": b.compute_buffer_mb, "projector_mb": b.projector_mb,
                "weights_host_mb": b.weights_host_mb, "host_mb": b.host_mb}
            out.append(ModelStatus(
                model_id=m.model_id, roles=list(m.roles), file_size_mb=facts.file_size_mb,
                memory_need_mb=sum(need.per_device_mb.values()),
                memory_source=(MemorySource.MEASURED if need.source == "measured"
                               else MemorySource.ESTIMATED),
                host_memory_need_mb=need.host_mb, allow_disk_paging=m.allow_disk_paging,
                memory_breakdown=breakdown, ctx_size=m.ctx_size,
                devices=list(m.devices) if m.devices else None,
                split=list(m.split) if m.split else None, pinned=m.pinned, preload=m.preload,
                exclusive=m.exclusive, ttl_s=self.config.ttl_of(m),
                last_load_s=round(load, 4) if load is not None else None,
                service_s=_round(service_s(sched.meters.values(), m.model_id)),
                recent_requests=sched.recent_requests(m.model_id)))
        return out

    def stop_records(self) -> list[StopRecord]:
        now = self._clock()
        return [StopRecord(model_id=s.model_id, devices=list(s.devices), reason=s.reason,
                           detail=s.detail, age_s=round(now - s.at, 3))
                for s in list(self.scheduler.stops)[-20:]]

    # -- llama-server output (node_agent.handlers_ops.LogSource) -----------------------------

    def _process_of(self, device: str, model: str | None) -> Any:
        running = [i for i in self.scheduler.instances_on(device) if i.process is not None
                   and (model is None or i.model_id == model)]
        if len(running) != 1 and model is None:
            return None  # several models there: name one
        proc = running[0].process if running else None
        return getattr(proc, "process", None)  # the LlamaProcess behind the launcher's handle

    def log_lines(self, device: str, model: str | None) -> list[str] | None:
        proc = self._process_of(device, model)
        return None if proc is None else list(proc.log_lines())

    def subscribe(self, device: str, model: str | None
                  ) -> contextlib.AbstractContextManager[asyncio.Queue[str | None]] | None:
        proc = self._process_of(device, model)
        return None if proc is None else proc.follow()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def inventory(self) -> NodeInventory:
        return NodeInventory(node_id=self.config.node_id, url=self.config.url,
                             backend=self.backend.name, seq=self.next_seq(),
                             devices=[self.device_status(d) for d in self.device_ids],
                             models=self.model_statuses(), sets=dict(self.config.sets),
                             draining=self.scheduler.draining,
                             co_residency=self.config.co_residency,
                             host_memory_total_mb=self.host()[0],
                             host_memory_available_mb=self.host()[1],
                             recent_stops=self.stop_records())

    # -- choosing a device (requests sent to this agent directly) ------------------------------

    def costs(self) -> dict[str, ModelCost]:
        sched = self.scheduler
        host = self.host()[1]
        out = {}
        for m in self.config.models:
            need = self.memory.need(m, self.best_placement(m), host)
            out[m.model_id] = ModelCost(
                sum(need.per_device_mb.values()),
                sched.load_seconds.get(m.model_id, DEFAULT_LOAD_S), devices=m.placement,
                split=m.split, pinned=m.pinned, exclusive=m.exclusive,
                host_need_mb=need.host_mb, allow_disk_paging=m.allow_disk_paging,
                service_s=service_s(sched.meters.values(), m.model_id))
        return out

    def views(self) -> list[DeviceView]:
        sched = self.scheduler
        figures = self.figures()
        servable = self.costs()
        recent = {m: sched.recent_requests(m) for m in servable}
        sets = {n: frozenset(ms) for n, ms in self.config.sets.items()}
        views = []
        for d in self.device_ids:
            fig = figures[d]
            in_flight, pending = sched.queue_of(d)
            residents = tuple(ResidentView(
                i.model_id, i.state, busy=i.in_flight + sched.queued_for(i.key),
                charged_mb=i.charged_mb.get(d, 0), pinned=i.model.pinned,
                exclusive=i.model.exclusive,
                devices=i.devices if len(i.devices) > 1 else ())
                for i in sched.instances_on(d))
            held = sched.held.get(d)
            views.append(DeviceView(
                node_id=self.config.node_id, device_id=d, servable=servable,
                memory_total_mb=fig.memory_total_mb, memory_free_mb=fig.memory_free_mb,
                residents=residents, in_flight=in_flight, pending=pending,
                pending_limit=self.config.max_pending_requests_per_device,
                recent_requests=recent, held=sets[held] if held else None, sets=sets,
                failed=sched.failed_models(d), draining=sched.draining,
                co_residency=self.config.co_residency, host_available_mb=self.host()[1]))
        return views

    def placement_of(self, model: ModelConfig, device: str) -> tuple[str, ...]:
        """The placement a dispatcher's X-RoleMesh-Device names for `model`."""
        devices = tuple(device.split("+"))
        unknown = [d for d in devices if d not in self.device_ids]
        if unknown:
            raise UnknownDevice(f"X-RoleMesh-Device {device!r} is not a device of node "
                                f"{self.config.node_id!r} ({', '.join(self.device_ids)})")
        if model.placement is not None and devices != model.placement:
            raise UnknownDevice(f"{model.model_id} runs on {'+'.join(model.placement)}, "
                                f"not on {device}")
        if model.placement is None and len(devices) != 1:
            raise UnknownDevice(f"{model.model_id} runs on one device, not on {device}")
        return devices

    def decide(self, name: str, device_id: str | None = None,
               model_id: str | None = None) -> Decision:
        models = self.config.models_for(name)
        if model_id is not None and self.config.model(model_id) is not None:
            # The dispatcher resolved the name (maybe an alias only it knows): final.
            models = [self.config.model(model_id)]  # type: ignore[list-item]
        if not models:
            known = sorted({m.model_id for m in self.config.models}
                           | {r for m in self.config.models for r in m.roles})
            raise ModelNotFound(f"model or role {name!r} is not served by node "
                                f"{self.config.node_id!r}; it serves: {', '.join(known)}")
        views = self.views()
        if device_id is not None:
            wanted = set(device_id.split("+"))
            unknown = sorted(wanted - set(self.device_ids))
            if unknown:
                raise UnknownDevice(f"X-RoleMesh-Device {device_id!r} is not a device of node "
                                    f"{self.config.node_id!r} ({', '.join(self.device_ids)})")
            views = [v for v in views if v.device_id in wanted]
        ids = [m.model_id for m in models]
        decision = choose(ids, views, self._policy)
        if decision.winner is None and decision.waits_for is not None:
            # The dispatcher would hold the request for a copy at its limit; an agent has
            # no such buffer: its best placement with room left takes it (loading there,
            # or queueing behind a switch its scheduler bounds) rather than a 503.
            free = [v for v in views if v.queue < v.pending_limit]
            if free:
                fallback = choose(ids, free, self._policy)
                if fallback.winner is not None:
                    return fallback
        return decision

    def pick(self, name: str, device_id: str | None = None,
             model_id: str | None = None) -> tuple[ModelConfig, tuple[str, ...]]:
        named = self.config.model(model_id) if model_id is not None else None
        if named is not None and device_id is not None:
            return named, self.placement_of(named, device_id)  # the dispatcher chose
        decision = self.decide(name, device_id, model_id)
        if decision.winner is not None:
            model = self.config.model(decision.winner.model_id)
            assert model is not None
            return model, tuple(decision.winner.device_id.split("+"))
        match decision.outcome:
            case Outcome.FITS_NOWHERE:
                margin = self.config.memory_safety_margin
                usable = (int(decision.largest_device_mb * margin)
                          if decision.largest_device_mb is not None else None)
                raise ModelDoesNotFit(f"{decision.explain()}: {usable} MB usable after the "
                                      f"{margin:g} safety margin")
            case Outcome.ALL_BUSY:
                raise DeviceBusy(decision.explain(),
                                 retry_after_s=decision.retry_after_s or 1.0)
            case _:
                raise ModelNotReady(decision.explain())


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None
