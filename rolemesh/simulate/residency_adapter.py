"""The node agent's residency planner (`rolemesh.planner.plan`, issue 8) as a device planner.

`plan(PlanView, now)` is node-wide; the simulation asks per device, so each call sees a
node of one device: its room (total x margin), its instances, and the requests the
dispatcher queued there (a waiter's placement is the device the decision named, as
`X-RoleMesh-Device` says). The actions come back one to one: a grant, a start, a drain
(with its reason), an undrain, a stop (with its reason), a refusal (a 503 the client
retries), a wake-up. Device groups, sets, held modes and operator wants are not modelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rolemesh import planner as p
from rolemesh.api import InstanceState as WireState
from rolemesh.residency import Room
from rolemesh.simulate.planners import (
    Action,
    DeviceSnapshot,
    Drain,
    Grant,
    InstanceState,
    Reject,
    Resume,
    Start,
    Stop,
    WaiterView,
    WakeAt,
)


class ResidencyPlanner:
    def __init__(self, *, patience_s: float, default_load_s: float,
                 co_residency: bool = True) -> None:
        self._state = {InstanceState.STARTING: WireState.STARTING,
                       InstanceState.READY: WireState.READY,
                       InstanceState.DRAINING: WireState.DRAINING}
        self.patience_s = patience_s
        self.default_load_s = default_load_s
        self.co_residency = co_residency

    def plan(self, view: DeviceSnapshot, waiters: Sequence[WaiterView],
             now: float) -> Sequence[Action]:
        dev = view.device_id
        where = (dev,)
        models = {m: p.ModelSpec(m, need, load_s=view.measured_load_s.get(m, self.default_load_s),
                                 parallel=view.parallel.get(m, 1), demand=view.demand.get(m, 0))
                  for m, need in view.memory_mb.items()}
        instances = tuple(
            p.InstanceView(key=p.instance_key(i.model_id, where), model_id=i.model_id,
                           devices=where, state=self._state[i.state],
                           charged_mb={dev: i.memory_mb}, in_flight=i.in_flight,
                           parallel=i.parallel, pinned=i.pinned,
                           idle_since=i.last_used if i.in_flight == 0 else None,
                           ready_at=i.ready_since or 0.0,
                           draining_for=i.draining_for
                           if i.state is InstanceState.DRAINING else None)
            for i in view.instances)
        plan_view = p.PlanView(
            rooms={dev: Room(view.total_mb, view.margin)}, device_order=where,
            models=models, instances=instances,
            waiters=tuple(p.WaiterView(w.waiter_id, w.model_id, where, w.enqueued_at)
                          for w in waiters),
            co_residency=self.co_residency, patience_s=self.patience_s)
        return [self._action(a) for a in p.plan(plan_view, now)]

    def _action(self, a: Any) -> Action:
        model = (a.instance.split("@", 1)[0] if hasattr(a, "instance") else
                 getattr(a, "model_id", ""))
        if isinstance(a, p.Grant):
            return Grant(a.waiter, model)
        if isinstance(a, p.Start):
            return Start(a.model_id)
        if isinstance(a, p.Drain):
            return Drain(model, a.why)
        if isinstance(a, p.Undrain):
            return Resume(model)
        if isinstance(a, p.Stop):
            return Stop(model, f"{a.reason.value} {a.detail or ''}".strip())
        if isinstance(a, p.Reject):
            return Reject(a.waiter, a.message)
        if isinstance(a, p.WakeAt):
            return WakeAt(a.at)
        raise TypeError(f"unknown planner action {a!r}")
