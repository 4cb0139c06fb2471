"""The simulated cluster as RoleMesh's decision sees it: one `DeviceView` per device.

What the dispatcher would know, built the way dispatcher/views.py and the registry build it:
its own count of requests sent and not finished as the queue, the node's recent requests
per model (600 s window) and last measured load time per model (`default_load_s` before
the first load), and the registry's `expect()` overlay: a device the dispatcher just sent
a model it did not hold shows as `starting` that model until the device's next answer.
The one simplification: the node's report is always fresh (no heartbeat delay).

This module is the adapter to the decision's input type: when `DeviceView` changes (a
device holding a set of instances, issue 8), this is the one file to change.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from rolemesh.api import SlotState
from rolemesh.decision import DeviceView, ModelCost
from rolemesh.simulate.cluster import ClusterFile, SimNode
from rolemesh.simulate.device import DeviceSim
from rolemesh.simulate.planners import InstanceState

RECENT_WINDOW_S = 600.0  # node_agent/slot.py RECENT_WINDOW_S

Key = tuple[str, str]

_SLOT_STATE = {InstanceState.STARTING: SlotState.STARTING, InstanceState.READY: SlotState.READY,
               InstanceState.DRAINING: SlotState.DRAINING}


@dataclass
class World:
    """The simulated cluster: devices in the order the cluster file lists them."""

    cluster: ClusterFile
    devices: dict[Key, DeviceSim] = field(default_factory=dict)
    nodes: dict[str, SimNode] = field(default_factory=dict)
    served: dict[tuple[str, str], deque[float]] = field(default_factory=dict)
    node_load_s: dict[tuple[str, str], float] = field(default_factory=dict)

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

    def serves(self, key: Key, model_id: str) -> bool:
        return model_id in self.devices[key].memory_mb


def device_view(world: World, device: DeviceSim, now: float) -> DeviceView:
    node_id, _ = device.key
    cluster = world.cluster
    default = cluster.dispatcher.default_load_s
    servable = {m: ModelCost(need, world.node_load_s.get((node_id, m), default))
                for m, need in device.memory_mb.items()}
    inst = next(iter(device.instances.values()), None)
    loaded = inst.model_id if inst is not None else None
    state = _SLOT_STATE[inst.state] if inst is not None else SlotState.EMPTY
    if device.expects is not None and device.expects != loaded:
        loaded, state = device.expects, SlotState.STARTING
    total = device.memory_total_mb
    free = None if total is None else total - device.charged_mb
    return DeviceView(
        node_id=node_id, device_id=device.key[1], servable=servable,
        memory_total_mb=total, memory_free_mb=free, loaded_model=loaded, slot_state=state,
        in_flight=device.queue, pending=0,
        pending_limit=device.pending_limit or cluster.agent.pending_limit,
        recent_requests={m: world.recent(node_id, m, now) for m in device.memory_mb})


def device_views(world: World, model_ids: Sequence[str], now: float,
                 exclude: Collection[Key] = ()) -> list[DeviceView]:
    """Every device of a node serving one of `model_ids`, less those in `exclude`."""
    return [device_view(world, d, now) for key, d in world.devices.items()
            if key not in exclude and any(m in d.memory_mb for m in model_ids)]
