"""The simulated cluster as RoleMesh's decision sees it: one `DeviceView` per device.

What the dispatcher would know, built the way dispatcher/views.py and the registry build it:
its own count of requests sent and not finished as the queue, the node's recent requests
per model (600 s window), last measured load time per model (`default_load_s` before the
first load), measured service time per model (`rolemesh.service_time`; for a node that
has not measured it, the mean over the nodes that have, as the registry keeps it; the
policy's `default_service_s` before any request ends), and the registry's `expect()`
overlay: a device the dispatcher just sent a model it did not hold shows as `starting`
that model until the device's next answer.
The one simplification: the node's report is always fresh (no heartbeat delay).

This module is the adapter to the decision's input type: the resident instances of each
device (`ResidentView`), with the overlay as one more, starting.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from rolemesh.api import InstanceState as WireState
from rolemesh.decision import DeviceView, ModelCost, ResidentView
from rolemesh.service_time import ServiceFigures, ServiceMeter, service_s
from rolemesh.simulate.cluster import ClusterFile, SimNode
from rolemesh.simulate.device import DeviceSim
from rolemesh.simulate.planners import InstanceState

RECENT_WINDOW_S = 600.0  # node_agent/slot.py RECENT_WINDOW_S

Key = tuple[str, str]

_STATE = {InstanceState.STARTING: WireState.STARTING, InstanceState.READY: WireState.READY,
          InstanceState.DRAINING: WireState.DRAINING}


@dataclass
class World:
    """The simulated cluster: devices in the order the cluster file lists them."""

    cluster: ClusterFile
    devices: dict[Key, DeviceSim] = field(default_factory=dict)
    nodes: dict[str, SimNode] = field(default_factory=dict)
    served: dict[tuple[str, str], deque[float]] = field(default_factory=dict)
    node_load_s: dict[tuple[str, str], float] = field(default_factory=dict)
    # What each device's agent measures of its requests (node_agent/scheduler.py's meters).
    meters: dict[Key, ServiceMeter] = field(default_factory=dict)
    # What the dispatcher's registry keeps of the nodes' reports: each model's mean.
    service: ServiceFigures = field(default_factory=ServiceFigures)
    # What the dispatcher's registry records: when it last routed to each device (the
    # decision spreads equal copies by it); and, for the request being routed, how many
    # requests for the same name the dispatcher holds before it (dispatcher/buffering.py).
    last_routed: dict[Key, float] = field(default_factory=dict)
    held_ahead: int = 0

    def record_grant(self, node_id: str, model_id: str, now: float) -> None:
        self.served.setdefault((node_id, model_id), deque()).append(now)

    def recent(self, node_id: str, model_id: str, now: float) -> int:
        served = self.served.get((node_id, model_id))
        if not served:
            return 0
        horizon = now - RECENT_WINDOW_S
        while served and served[0] < horizon:
            served.popleft()
        return len(served)

    def meter(self, key: Key) -> ServiceMeter:
        return self.meters.setdefault(key, ServiceMeter())

    def request_finished(self, key: Key, request: int, now: float) -> None:
        """The device's meter takes the request's figure, and its node reports its models'
        figures to the registry (instantly: heartbeats are not modelled)."""
        self.meter(key).finished(request, now)
        node_id = key[0]
        self.service.report(node_id, {
            m: s for m in self.cluster.serves(self.nodes[node_id])
            if (s := self.service_s(node_id, m)) is not None})

    def service_s(self, node_id: str, model_id: str) -> float | None:
        """The node's figure, as its agent reports it (over the node's devices)."""
        return service_s((m for k, m in self.meters.items() if k[0] == node_id), model_id)

    def serves(self, key: Key, model_id: str) -> bool:
        return model_id in self.devices[key].memory_mb


def device_view(world: World, device: DeviceSim, now: float,
                co_residency: bool = False) -> DeviceView:
    node_id, _ = device.key
    cluster = world.cluster
    default = cluster.dispatcher.default_load_s
    servable = {m: ModelCost(need, world.node_load_s.get((node_id, m), default),
                             service_s=world.service_s(node_id, m))
                for m, need in device.memory_mb.items()}
    total = device.memory_total_mb
    waiting: dict[str, int] = {}
    for w in device.waiters:
        waiting[w.model_id] = waiting.get(w.model_id, 0) + 1
    residents = [ResidentView(model_id=i.model_id, state=_STATE[i.state],
                              busy=i.in_flight + waiting.get(i.model_id, 0),
                              charged_mb=i.memory_mb, pinned=i.pinned)
                 for i in device.instances.values()]
    if device.expects is not None and device.expects not in device.instances:
        residents.append(ResidentView(model_id=device.expects, state=WireState.STARTING,
                                      busy=waiting.get(device.expects, 0),
                                      charged_mb=device.memory_mb.get(device.expects, 0)))
    return DeviceView(
        node_id=node_id, device_id=device.key[1], servable=servable, memory_total_mb=total,
        memory_free_mb=None if total is None else total - device.charged_mb,
        residents=tuple(residents), in_flight=device.queue, pending=0,
        pending_limit=device.pending_limit or cluster.agent.pending_limit,
        recent_requests={m: world.recent(node_id, m, now) for m in device.memory_mb},
        last_routed=world.last_routed.get(device.key, 0.0), co_residency=co_residency)


def device_views(world: World, model_ids: Sequence[str], now: float,
                 exclude: Collection[Key] = (), co_residency: bool = False
                 ) -> list[DeviceView]:
    """Every device of a node serving one of `model_ids`, less those in `exclude`."""
    return [device_view(world, d, now, co_residency) for key, d in world.devices.items()
            if key not in exclude and any(m in d.memory_mb for m in model_ids)]
