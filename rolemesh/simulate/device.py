"""One simulated device: its instances, its waiters, its running requests, in simulated time.

The device owns its state the way the node agent's device owner does: it admits a request
(or refuses it at the pending limit), then after every change asks its planner what to do
and executes the actions: grants start requests, starts begin loads (done after the
model's load time), stops free memory at once. Running requests share the device's
throughput (see `world`). Times come from the engine through `now`; the device schedules
its own next event (a first token, a finish, a load done, a wake-up) with `Clock.at`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rolemesh.simulate.planners import (
    Action,
    DevicePlanner,
    DeviceSnapshot,
    Drain,
    Grant,
    InstanceState,
    InstanceView,
    Reject,
    Resume,
    Start,
    Stop,
    WaiterView,
    WakeAt,
)
from rolemesh.simulate.world import Work

EPS = 1e-9
MAX_PLAN_ROUNDS = 8


class SimulationError(Exception):
    """A planner asked for something a real device could not do (a bug in the planner)."""


class Clock(Protocol):
    def at(self, t: float, fn: Callable[[float], None]) -> None: ...


class Listener(Protocol):
    """What the engine hears from a device."""

    def granted(self, rid: int, key: tuple[str, str], model_id: str, now: float) -> None: ...
    def first_token(self, rid: int, now: float) -> None: ...
    def finished(self, rid: int, key: tuple[str, str], now: float) -> None: ...
    def refused(self, rid: int, key: tuple[str, str], now: float) -> None: ...
    def loaded(self, key: tuple[str, str], model_id: str, load_s: float) -> None: ...


@dataclass
class Instance:
    model_id: str
    memory_mb: int
    parallel: int
    pinned: bool
    state: InstanceState
    load_started: float
    load_s: float
    ready_since: float | None = None
    last_used: float = 0.0
    in_flight: int = 0
    token: int = 0  # which load a "load done" event belongs to
    draining_for: str | None = None


@dataclass
class Waiter:
    rid: int
    model_id: str
    enqueued_at: float
    work: Callable[[str], Work]  # the request's work on the model that serves it
    view: WaiterView = field(init=False)

    def __post_init__(self) -> None:
        self.view = WaiterView(self.rid, self.model_id, self.enqueued_at)


@dataclass
class Job:
    rid: int
    model_id: str
    work: Work
    done_s: float = 0.0  # seconds of work done, alone-speed
    first_token: bool = False


@dataclass
class LoadStats:
    loads: int = 0
    load_s: float = 0.0  # device-seconds spent loading, wasted loads included
    stops: dict[str, int] = field(default_factory=dict)  # reason -> count


class DeviceSim:
    def __init__(self, key: tuple[str, str], memory_total_mb: int | None, usable_mb: float,
                 speed: float, planner: DevicePlanner, memory_mb: Mapping[str, int],
                 parallel: Mapping[str, int], load_s: Callable[[str], float],
                 pending_limit: int | None, clock: Clock, listener: Listener) -> None:
        self.key = key
        self.memory_total_mb = memory_total_mb
        self.usable_mb = usable_mb
        self.speed = speed
        self.planner = planner
        self.memory_mb = dict(memory_mb)
        self.parallel = dict(parallel)
        self._load_s = load_s
        self.pending_limit = pending_limit
        self._clock = clock
        self._listener = listener
        self.instances: dict[str, Instance] = {}
        self.waiters: list[Waiter] = []
        self.jobs: dict[int, Job] = {}
        self.measured_load_s: dict[str, float] = {}
        self.stats = LoadStats()
        self.expects: str | None = None  # what the dispatcher believes it is loading
        self._t = 0.0
        self._tick_version = 0
        self._tokens = 0
        self._wakes: set[float] = set()
        self.demand: Callable[[str, float], int] = lambda model, now: 0  # set by the engine
        self.margin = 0.9
        self._pumping = False

    # -- what routers read ---------------------------------------------------------------

    @property
    def queue(self) -> int:
        """Requests running or waiting here: what a dispatcher counts as sent, not done."""
        return len(self.jobs) + len(self.waiters)

    @property
    def charged_mb(self) -> int:
        return sum(i.memory_mb for i in self.instances.values())

    def holds(self, model_id: str) -> bool:
        return model_id in self.instances

    # -- the world's requests ---------------------------------------------------------------

    def preload(self, model_id: str, *, pinned: bool, now: float = 0.0) -> None:
        """Resident before the first request: no load counted."""
        self.instances[model_id] = Instance(
            model_id, self.memory_mb[model_id], self.parallel[model_id], pinned,
            InstanceState.READY, now, 0.0, ready_since=now, last_used=now)

    def admit(self, waiter: Waiter, now: float) -> bool:
        """Queue a request; False (a 503) at the pending limit."""
        if self.pending_limit is not None and self.queue >= self.pending_limit:
            return False
        self.waiters.append(waiter)
        self.pump(now)
        return True

    def abandon(self, rid: int, now: float) -> bool:
        """A waiter gives up (its queue timeout); True if it was still waiting."""
        for i, w in enumerate(self.waiters):
            if w.rid == rid:
                del self.waiters[i]
                self.pump(now)
                return True
        return False

    # -- the one place that decides what happens next ------------------------------------

    def pump(self, now: float) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            self._advance(now)
            for _ in range(MAX_PLAN_ROUNDS):
                actions = self.planner.plan(self.snapshot(now), self._waiter_views(), now)
                if not self._apply(actions, now):
                    break
            else:
                raise SimulationError(f"{self.key}: the planner keeps acting without settling")
            self._schedule_tick(now)
        finally:
            self._pumping = False

    def snapshot(self, now: float) -> DeviceSnapshot:
        return DeviceSnapshot(
            device_id=self.key[1], usable_mb=self.usable_mb,
            instances=tuple(InstanceView(i.model_id, i.state, i.in_flight, i.parallel,
                                         i.memory_mb, i.pinned, i.ready_since, i.last_used,
                                         i.draining_for)
                            for i in self.instances.values()),
            memory_mb=self.memory_mb, measured_load_s=self.measured_load_s,
            total_mb=self.memory_total_mb, margin=self.margin, parallel=self.parallel,
            demand={m: self.demand(m, now) for m in self.memory_mb})

    def _waiter_views(self) -> list[WaiterView]:
        return [w.view for w in self.waiters]

    def _apply(self, actions: Sequence[Action], now: float) -> bool:
        changed = False
        for action in actions:
            match action:
                case Grant(waiter_id=rid, model_id=model):
                    self._grant(rid, model, now)
                    changed = True
                case Stop(model_id=model, reason=reason):
                    self._stop(model, reason, now)
                    changed = True
                case Start(model_id=model):
                    self._start(model, now)
                    changed = True
                case Drain(model_id=model, why=why):
                    changed |= self._set_state(model, InstanceState.DRAINING, why)
                case Resume(model_id=model):
                    changed |= self._set_state(model, InstanceState.READY)
                case Reject(waiter_id=rid):
                    self._reject(rid, now)
                    changed = True
                case WakeAt(at_s=t):
                    self._wake(max(t, now))
                case _:
                    raise SimulationError(f"{self.key}: unknown action {action!r}")
        return changed

    def _grant(self, rid: int, model: str, now: float) -> None:
        inst = self.instances.get(model)
        if inst is None or inst.state is not InstanceState.READY:
            raise SimulationError(f"{self.key}: grant for {model} which is not ready")
        if inst.in_flight >= inst.parallel:
            raise SimulationError(f"{self.key}: grant beyond {model}'s {inst.parallel} slots")
        index = next((i for i, w in enumerate(self.waiters) if w.rid == rid), None)
        if index is None:
            raise SimulationError(f"{self.key}: grant for unknown waiter {rid}")
        waiter = self.waiters.pop(index)
        if waiter.model_id != model:
            raise SimulationError(f"{self.key}: waiter {rid} wants {waiter.model_id}")
        inst.in_flight += 1
        inst.last_used = now
        self.jobs[rid] = Job(rid, model, waiter.work(model))
        self._listener.granted(rid, self.key, model, now)

    def _start(self, model: str, now: float) -> None:
        if model in self.instances:
            raise SimulationError(f"{self.key}: {model} is already resident")
        need = self.memory_mb[model]
        if self.charged_mb + need > self.usable_mb + EPS:
            raise SimulationError(f"{self.key}: no room for {model} ({need} MB; "
                                  f"{self.charged_mb} of {self.usable_mb:g} MB charged)")
        self._tokens += 1
        load_s = self._load_s(model)
        inst = Instance(model, need, self.parallel[model], False, InstanceState.STARTING,
                        now, load_s, token=self._tokens)
        self.instances[model] = inst
        self.stats.loads += 1
        self.stats.load_s += load_s
        self.expects = None
        token = inst.token
        self._clock.at(now + load_s, lambda t: self._load_done(model, token, t))

    def _load_done(self, model: str, token: int, now: float) -> None:
        inst = self.instances.get(model)
        if inst is None or inst.token != token:
            return  # stopped while loading
        inst.state = InstanceState.READY
        inst.ready_since = now
        inst.last_used = now
        self.measured_load_s[model] = inst.load_s
        self._listener.loaded(self.key, model, inst.load_s)
        self.pump(now)

    def _stop(self, model: str, reason: str, now: float) -> None:
        inst = self.instances.get(model)
        if inst is None:
            raise SimulationError(f"{self.key}: stop of {model}, which is not resident")
        if inst.in_flight:
            raise SimulationError(f"{self.key}: stop of {model} with {inst.in_flight} running")
        if inst.pinned:
            raise SimulationError(f"{self.key}: stop of pinned {model}")
        if inst.state is InstanceState.STARTING:  # a load cut short: count what it took
            self.stats.load_s -= inst.load_s - (now - inst.load_started)
        del self.instances[model]
        kind = reason.split(maxsplit=1)[0]
        self.stats.stops[kind] = self.stats.stops.get(kind, 0) + 1

    def _set_state(self, model: str, state: InstanceState, why: str | None = None) -> bool:
        inst = self.instances.get(model)
        if inst is None or inst.state is InstanceState.STARTING or inst.state is state:
            return False
        inst.state = state
        inst.draining_for = why if state is InstanceState.DRAINING else None
        return True

    def _reject(self, rid: int, now: float) -> None:
        index = next((i for i, w in enumerate(self.waiters) if w.rid == rid), None)
        if index is None:
            raise SimulationError(f"{self.key}: reject of unknown waiter {rid}")
        del self.waiters[index]
        self._listener.refused(rid, self.key, now)

    def _wake(self, t: float) -> None:
        if t in self._wakes or math.isinf(t):
            return
        self._wakes.add(t)

        def wake(now: float) -> None:
            self._wakes.discard(t)
            self.pump(now)
        self._clock.at(t, wake)

    # -- running requests: processor sharing -------------------------------------------------

    def _advance(self, now: float) -> None:
        dt = now - self._t
        self._t = now
        if dt > 0 and self.jobs:
            share = dt / len(self.jobs)
            for job in self.jobs.values():
                job.done_s += share

    def _schedule_tick(self, now: float) -> None:
        self._tick_version += 1
        if not self.jobs:
            return
        left = min(self._left(job) for job in self.jobs.values())
        version = self._tick_version
        self._clock.at(now + max(left, 0.0) * len(self.jobs),
                       lambda t: self._tick(version, t))

    @staticmethod
    def _left(job: Job) -> float:
        target = job.work.total_s if job.first_token else job.work.prefill_s
        return target - job.done_s

    def _tick(self, version: int, now: float) -> None:
        if version != self._tick_version:
            return
        self._advance(now)
        finished = []
        for job in list(self.jobs.values()):
            if not job.first_token and job.done_s >= job.work.prefill_s - EPS:
                job.first_token = True
                self._listener.first_token(job.rid, now)
            if job.first_token and job.done_s >= job.work.total_s - EPS:
                finished.append(job)
        for job in finished:
            del self.jobs[job.rid]
            inst = self.instances[job.model_id]
            inst.in_flight -= 1
            inst.last_used = now
            self.expects = None  # an answer's headers tell the dispatcher the truth
            self._listener.finished(job.rid, self.key, now)
        self.pump(now)
