"""Per-device policies: `plan(view, waiters, now) -> actions`, pure functions of data.

This is the seam where a device's rules plug into the simulation (see `DevicePlanner`).
A planner sees one device (its resident instances and what loading each model would take)
and the requests waiting for it, and answers with actions; the simulated device executes
them and asks again whenever something changes or a `WakeAt` comes due. It never reads a
clock: `now` is passed in. The node agent's owner of a device is meant to have the same
shape (issue 8: grant, start, stop with a reason, wake at T), so its planner plugs in here
with a thin adapter that converts `DeviceSnapshot`/`WaiterView` to its view and its
actions back to these.

- `TodaysAgent`: node_agent/slot.py today: one model per device, loaded-first queueing,
  a switch once the loaded model has no work or a waiter has been held back long enough
  (max(max_switch_wait_s, that model's last load time), counted from when it queued or the
  loaded model became ready, whichever is later).
- `QueuePlanner`: the baselines' devices: one FIFO queue that a request for a model not
  resident blocks, models side by side while memory allows, least recently used instance
  evicted first, optional TTL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class InstanceState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # no new grants: it is to stop once its requests finish


@dataclass(frozen=True, slots=True)
class InstanceView:
    model_id: str
    state: InstanceState
    in_flight: int
    parallel: int
    memory_mb: int
    pinned: bool
    ready_since: float | None  # None while starting
    last_used: float  # last grant or finish (or load done)
    draining_for: str | None = None  # the reason its Drain gave


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    device_id: str
    usable_mb: float  # total x safety margin; inf when the total is unknown
    instances: tuple[InstanceView, ...]
    memory_mb: Mapping[str, int]  # model id -> need, for every model this device may run
    measured_load_s: Mapping[str, float]  # model id -> its last load here (absent: never)
    total_mb: int | None = None  # None: unknown
    margin: float = 0.9
    parallel: Mapping[str, int] = field(default_factory=dict)  # model id -> its slots
    demand: Mapping[str, int] = field(default_factory=dict)  # model -> recent requests (node)

    def instance(self, model_id: str) -> InstanceView | None:
        return next((i for i in self.instances if i.model_id == model_id), None)


@dataclass(frozen=True, slots=True)
class WaiterView:
    waiter_id: int
    model_id: str
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class Grant:
    waiter_id: int
    model_id: str


@dataclass(frozen=True, slots=True)
class Start:
    model_id: str


@dataclass(frozen=True, slots=True)
class Stop:
    model_id: str
    reason: str  # evicted_for, ttl, switch, ...


@dataclass(frozen=True, slots=True)
class Drain:
    model_id: str
    why: str = "switch"


@dataclass(frozen=True, slots=True)
class Resume:
    model_id: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse a waiting request (a 503: the client may retry)."""

    waiter_id: int
    message: str


@dataclass(frozen=True, slots=True)
class WakeAt:
    at_s: float


Action = Grant | Start | Stop | Drain | Resume | Reject | WakeAt


class DevicePlanner(Protocol):
    """What a simulated device asks after every change. Must not keep state between calls."""

    def plan(self, view: DeviceSnapshot, waiters: Sequence[WaiterView],
             now: float) -> Sequence[Action]: ...


@dataclass(frozen=True)
class TodaysAgent:
    """node_agent/slot.py's `_pump`, as a pure function (one model per device)."""

    max_switch_wait_s: float = 30.0

    def plan(self, view: DeviceSnapshot, waiters: Sequence[WaiterView],
             now: float) -> Sequence[Action]:
        inst = view.instances[0] if view.instances else None
        if inst is None:
            return [Start(waiters[0].model_id)] if waiters else []
        if inst.state is InstanceState.STARTING:
            return []
        loaded = inst.model_id
        same = [w for w in waiters if w.model_id == loaded]
        other = [w for w in waiters if w.model_id != loaded]
        due_at = self._patience_ends(view, inst, other[0]) if other else math.inf
        switch_due = bool(other) and ((not same and inst.in_flight == 0) or now >= due_at)
        actions: list[Action] = []
        state = inst.state
        if state is InstanceState.DRAINING and not other:
            actions.append(Resume(loaded))  # whoever wanted the switch is gone
            state = InstanceState.READY
        if state is InstanceState.READY and not switch_due:
            room = inst.parallel - inst.in_flight
            actions += [Grant(w.waiter_id, loaded) for w in same[:max(room, 0)]]
            if other:
                actions.append(WakeAt(due_at))
            return actions
        if not other:
            return actions
        if state is InstanceState.READY:
            actions.append(Drain(loaded))
        if inst.in_flight == 0:
            actions += [Stop(loaded, "switch"), Start(other[0].model_id)]
        return actions

    def _patience_ends(self, view: DeviceSnapshot, inst: InstanceView,
                       waiter: WaiterView) -> float:
        bound = max(self.max_switch_wait_s, view.measured_load_s.get(waiter.model_id, 0.0))
        held_since = max(waiter.enqueued_at, inst.ready_since or 0.0)
        return held_since + bound


@dataclass(frozen=True)
class QueuePlanner:
    """A baseline device: one FIFO queue, models side by side while memory allows.

    As Ollama's scheduler and llama-swap do, requests are taken in arrival order: one for
    a resident model is handed to it (and runs when one of its parallel slots is free),
    one for a model that is not resident blocks the queue behind it until that model is
    loaded. Room is made by stopping the least recently used instances that nobody ahead
    in the queue is waiting for (busy ones are drained first). `max_resident`: at most
    this many instances (1: one model per device). `ttl_s`: an idle instance nobody waits
    for is stopped after that long (Ollama's keep_alive).
    """

    max_resident: int | None = None
    ttl_s: float | None = None

    def plan(self, view: DeviceSnapshot, waiters: Sequence[WaiterView],
             now: float) -> Sequence[Action]:
        resident = {i.model_id: i for i in view.instances}
        actions, blocked, ahead = self._grants(resident, waiters)
        stopped: set[str] = set()
        if self.ttl_s is not None:
            actions += self._expire(view, waiters, now, stopped)
        draining: set[str] = set()
        if blocked is not None and blocked not in resident:
            actions += self._make_room(view, blocked, ahead, stopped, draining)
        elif blocked is not None:
            draining.add(blocked)  # still draining: it leaves once its requests are done
        actions += [Resume(i.model_id) for i in view.instances
                    if i.state is InstanceState.DRAINING and i.model_id not in draining
                    and i.model_id not in stopped]
        return actions

    @staticmethod
    def _grants(resident: Mapping[str, InstanceView], waiters: Sequence[WaiterView]
                ) -> tuple[list[Action], str | None, set[str]]:
        """Grants in arrival order up to the first waiter whose model is not resident."""
        actions: list[Action] = []
        room = {m: i.parallel - i.in_flight for m, i in resident.items()
                if i.state is InstanceState.READY}
        free = sum(r for r in room.values() if r > 0)
        taking = {m for m, i in resident.items() if i.state is not InstanceState.DRAINING}
        ahead: set[str] = set()  # models that requests ahead of the blocked one wait for
        for index, w in enumerate(waiters):
            m = w.model_id
            if m not in taking:
                return actions, m, ahead
            ahead.add(m)
            if room.get(m, 0) > 0:
                room[m] -= 1
                free -= 1
                actions.append(Grant(w.waiter_id, m))
            elif free == 0 and len(ahead) == len(taking):
                # Nothing more can be granted and every model is ahead: only the first
                # waiter for a model that is not resident is still of interest (long queues).
                blocked = next((v.model_id for v in waiters[index + 1:]
                                if v.model_id not in taking), None)
                return actions, blocked, ahead
        return actions, None, ahead

    def _expire(self, view: DeviceSnapshot, waiters: Sequence[WaiterView], now: float,
                stopped: set[str]) -> list[Action]:
        assert self.ttl_s is not None
        actions: list[Action] = []
        wanted = {w.model_id for w in waiters}
        for i in view.instances:
            if (i.state is InstanceState.READY and i.in_flight == 0 and not i.pinned
                    and i.model_id not in wanted):
                if now >= i.last_used + self.ttl_s:
                    actions.append(Stop(i.model_id, "ttl"))
                    stopped.add(i.model_id)
                else:
                    actions.append(WakeAt(i.last_used + self.ttl_s))
        return actions

    def _make_room(self, view: DeviceSnapshot, blocked: str, ahead: set[str],
                   stopped: set[str], draining: set[str]) -> list[Action]:
        actions: list[Action] = []
        for v in self._victims(view, blocked, ahead, stopped):
            if v.in_flight == 0:
                actions.append(Stop(v.model_id, f"evicted_for {blocked}"))
                stopped.add(v.model_id)
            else:
                draining.add(v.model_id)
                if v.state is InstanceState.READY:
                    actions.append(Drain(v.model_id))
        if not draining and self._fits_after(view, blocked, stopped):
            actions.append(Start(blocked))
        return actions

    def _fits_after(self, view: DeviceSnapshot, model: str, stopped: set[str]) -> bool:
        kept = [i for i in view.instances if i.model_id not in stopped]
        if self.max_resident is not None and len(kept) >= self.max_resident:
            return False
        return sum(i.memory_mb for i in kept) + view.memory_mb[model] <= view.usable_mb

    def _victims(self, view: DeviceSnapshot, model: str, ahead: set[str],
                 stopped: set[str]) -> list[InstanceView]:
        """The least recently used instances whose leaving makes room for `model`."""
        if self._fits_after(view, model, stopped):
            return []
        order = sorted((i for i in view.instances
                        if i.model_id not in stopped and i.model_id not in ahead
                        and not i.pinned and i.state is not InstanceState.STARTING),
                       key=lambda i: (i.in_flight > 0, i.last_used, i.model_id))
        chosen: list[InstanceView] = []
        gone = set(stopped)
        for i in order:
            chosen.append(i)
            gone.add(i.model_id)
            if self._fits_after(view, model, gone):
                return chosen
        return []  # what holds the room is wanted ahead, pinned or starting: wait
