"""The node registry: the one owner of what the dispatcher knows about nodes and devices.

Only `Registry`'s methods change that knowledge: registrations, heartbeats (a rising `seq`;
older ones are dropped), expiry (missed heartbeats -> `down`, later forgotten), the device
state that every agent response carries in its headers, and the dispatcher's own count of
requests in flight per device. Records are immutable and replaced on change, so a
`snapshot()` can be read by the pure functions in `dispatcher.views` without copying them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import structlog

from rolemesh.api import (
    DeviceStatus,
    HeartbeatRequest,
    InstanceState,
    ModelStatus,
    NodeInventory,
    NodeState,
    StopRecord,
)
from rolemesh.decision import ModelCost
from rolemesh.errors import NodeNotFound
from rolemesh.service_time import ServiceFigures

log = structlog.get_logger("dispatcher.registry")

Key = tuple[str, str]  # (node_id, device_id)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device: the node's last full report, overlaid with fresher observations."""

    status: DeviceStatus  # memory, name, limits: from the last registration or heartbeat
    # These four: from the freshest of heartbeat, response headers and the dispatcher's
    # own routing (see Registry.expect). Residents are (model id, state) pairs.
    residents: tuple[tuple[str, InstanceState], ...]
    in_flight: int
    pending: int
    # The part of the reported queue (in_flight + pending) that was not this dispatcher's
    # own requests at the moment of the report: other dispatchers, direct clients.
    others: int
    # The same per resident model (its in flight + queued beyond the dispatcher's own).
    model_others: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    url: str
    backend: str
    state: NodeState
    seq: int
    registered_at: float
    last_seen: float  # when the last accepted registration or heartbeat arrived
    models: tuple[ModelStatus, ...]
    costs: Mapping[str, ModelCost]  # model id -> what holding and loading it costs here
    recent_requests: Mapping[str, int]  # model id -> requests served in the recent window
    device_ids: tuple[str, ...]
    sets: Mapping[str, frozenset[str]] = field(default_factory=dict)
    draining: bool = False
    co_residency: bool = True
    recent_stops: tuple[StopRecord, ...] = ()
    host_memory_total_mb: int | None = None
    host_memory_available_mb: int | None = None


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    nodes: Mapping[str, NodeRecord]
    devices: Mapping[Key, DeviceRecord]
    own_in_flight: Mapping[Key, int]
    now: float
    own_by_model: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    last_routed: Mapping[Key, float] = field(default_factory=dict)  # when begin() last ran


@dataclass(frozen=True, slots=True)
class Change:
    node_id: str
    change: str  # "down" or "forgotten"


class Registry:
    def __init__(self, *, timeout_s: float, forget_s: float, default_load_s: float = 5.0,
                 clock: Callable[[], float]) -> None:
        self.timeout_s = timeout_s
        self.forget_s = forget_s
        self.default_load_s = default_load_s
        self._clock = clock
        self._nodes: dict[str, NodeRecord] = {}
        self._devices: dict[Key, DeviceRecord] = {}
        self._own: dict[Key, int] = {}
        self._own_model: dict[tuple[str, str, str], int] = {}
        self._last_routed: dict[Key, float] = {}
        self.service = ServiceFigures()
        # Called after each change that may free room for a request held at the
        # dispatcher (dispatcher/buffering.py): a request ended, a report or an answer's
        # headers told a device's state, a node joined or stopped draining.
        self.listeners: list[Callable[[], None]] = []
        # Rises whenever nodes, their models or their up/down state change (not per
        # request): caches of what the cluster serves key on it.
        self.version = 0

    # -- reports from nodes ------------------------------------------------------------------

    def register(self, inventory: NodeInventory) -> NodeRecord:
        """A node (re)joins. Always accepted: a restarted agent starts its `seq` again."""
        now = self._clock()
        old = self._nodes.get(inventory.node_id)
        if old is not None and old.url != inventory.url:
            log.warning("node.url_changed", node_id=inventory.node_id, old_url=old.url,
                        url=inventory.url)
        node = NodeRecord(
            node_id=inventory.node_id, url=inventory.url.rstrip("/"), backend=inventory.backend,
            state=NodeState.UP, seq=inventory.seq, registered_at=now, last_seen=now,
            models=(), costs={}, recent_requests={}, device_ids=(),
            sets={k: frozenset(v) for k, v in inventory.sets.items()},
            draining=inventory.draining, co_residency=inventory.co_residency,
            recent_stops=tuple(inventory.recent_stops),
            host_memory_total_mb=inventory.host_memory_total_mb,
            host_memory_available_mb=inventory.host_memory_available_mb)
        node = self._with_models(node, inventory.models)
        self._drop_devices(old)
        self._nodes[inventory.node_id] = self._with_devices(node, inventory.devices)
        self.version += 1
        log.info("node.registered", node_id=inventory.node_id, url=inventory.url,
                 devices=[d.device_id for d in inventory.devices],
                 models=[m.model_id for m in inventory.models], again=old is not None)
        self._changed()
        return self._nodes[inventory.node_id]

    def heartbeat(self, beat: HeartbeatRequest) -> bool:
        """Apply a heartbeat; False when it is not newer than the last report (dropped)."""
        node = self._nodes.get(beat.node_id)
        if node is None:
            raise NodeNotFound(f"node {beat.node_id!r} is not registered; register again")
        if beat.seq <= node.seq:
            log.debug("node.heartbeat_dropped", node_id=beat.node_id, seq=beat.seq,
                      last_seq=node.seq)
            return False
        before = {d: self._devices.get((beat.node_id, d)) for d in node.device_ids}
        # One record built once (dataclasses.replace, three times over, was a tenth of a
        # heartbeat's CPU at 200 a second).
        models, costs, recent = node.models, node.costs, node.recent_requests
        if beat.models is not None:
            models, costs, recent = self._model_fields(node.node_id, beat.models)
        self._drop_devices(node, keep={d.device_id for d in beat.devices})
        updated = NodeRecord(
            node_id=node.node_id, url=node.url, backend=node.backend, state=NodeState.UP,
            seq=beat.seq, registered_at=node.registered_at, last_seen=self._clock(),
            models=models, costs=costs, recent_requests=recent,
            device_ids=self._put_devices(node.node_id, beat.devices),
            sets=(node.sets if beat.sets is None
                  else {k: frozenset(v) for k, v in beat.sets.items()}),
            draining=beat.draining, co_residency=node.co_residency,
            recent_stops=tuple(beat.recent_stops),
            host_memory_total_mb=beat.host_memory_total_mb,
            host_memory_available_mb=beat.host_memory_available_mb)
        self._nodes[beat.node_id] = updated
        # Agents leave unchanged models out: then what the node serves has not changed.
        served_changed = beat.models is not None and _served(updated) != _served(node)
        # Most heartbeats only refresh figures: what the cluster serves is unchanged, and
        # the caches keyed on `version` (the catalog, the view memo) stay valid.
        if (node.state is not NodeState.UP or updated.device_ids != node.device_ids
                or served_changed or updated.draining != node.draining):
            self.version += 1
        if node.state is not NodeState.UP:
            log.info("node.state_changed", node_id=beat.node_id, old=node.state.value,
                     new=NodeState.UP.value, why="heartbeat")
        # Most heartbeats of a busy cluster say nothing a held request waits for (each
        # wakes a pass over the buffer: 200 a second at 1,000 nodes); the requests that end
        # here tell the buffer themselves.
        if (node.state is not NodeState.UP or updated.draining != node.draining
                or updated.sets != node.sets or served_changed
                or any(_may_admit_more(before.get(d), self._devices[(beat.node_id, d)])
                       for d in updated.device_ids)):
            self._changed()
        return True

    def expire(self) -> list[Change]:
        """Mark nodes that missed heartbeats `down`, forget those gone for longer."""
        now = self._clock()
        changes: list[Change] = []
        for node in list(self._nodes.values()):
            silent_s = now - node.last_seen
            if silent_s >= self.forget_s:
                del self._nodes[node.node_id]
                self._drop_devices(node)
                self.service.drop(node.node_id)
                changes.append(Change(node.node_id, "forgotten"))
                log.warning("node.forgotten", node_id=node.node_id, silent_s=round(silent_s, 3))
            elif silent_s >= self.timeout_s and node.state is NodeState.UP:
                self._nodes[node.node_id] = replace(node, state=NodeState.DOWN)
                changes.append(Change(node.node_id, "down"))
                log.warning("node.state_changed", node_id=node.node_id, old="up", new="down",
                            why="missed heartbeats", silent_s=round(silent_s, 3))
        if changes:
            self.version += 1
        return changes

    def forget(self, node_id: str, why: str) -> bool:
        """A node left on purpose (its agent deregistered as it stopped): forget it now."""
        node = self._nodes.pop(node_id, None)
        if node is None:
            return False
        self._drop_devices(node)
        self.service.drop(node_id)
        self.version += 1
        log.info("node.forgotten", node_id=node_id, why=why)
        return True

    def mark_down(self, node_id: str, why: str) -> bool:
        """Stop routing to a node now (its agent refused a connection); a heartbeat revives it."""
        node = self._nodes.get(node_id)
        if node is None or node.state is NodeState.DOWN:
            return False
        self._nodes[node_id] = replace(node, state=NodeState.DOWN)
        self.version += 1
        log.warning("node.state_changed", node_id=node_id, old="up", new="down", why=why)
        return True

    # -- what the dispatcher sees between heartbeats -------------------------------------------

    def set_draining(self, node_id: str, draining: bool) -> None:
        """Stop (or resume) routing to a node now, before its next heartbeat says so."""
        node = self._nodes.get(node_id)
        if node is not None and node.draining != draining:
            self._nodes[node_id] = replace(node, draining=draining)
            self.version += 1
            self._changed()

    def observe(self, key: Key, residents: tuple[tuple[str, InstanceState], ...],
                in_flight: int, pending: int) -> None:
        """A device's state as an agent response's headers report it, right after it."""
        key = (key[0], key[1].split("+")[0])  # a group's headers speak for its first device
        record = self._devices.get(key)
        if record is None:
            return
        others = max(0, in_flight + pending - self._own.get(key, 0))
        model_others = record.model_others if others else {}
        self._devices[key] = DeviceRecord(record.status, residents, in_flight, pending,
                                          others, model_others)
        self._changed()

    def expect(self, key: Key, model_id: str) -> None:
        """The dispatcher just sent `model_id` to a device that did not hold it.

        The agent starts loading it at once; saying so here keeps the next decisions (made
        before any header or heartbeat tells) from sending another model to the same device
        while an empty one waits.
        """
        for device_id in key[1].split("+"):
            k = (key[0], device_id)
            record = self._devices.get(k)
            if record is not None and all(m != model_id for m, _ in record.residents):
                self._devices[k] = replace(
                    record, residents=(*record.residents, (model_id, InstanceState.STARTING)))

    def begin(self, key: Key, model_id: str = "") -> None:
        """The dispatcher sends a request to a placement (a device, or "gpu:0+gpu:1")."""
        now = self._clock()
        for device_id in key[1].split("+"):
            k = (key[0], device_id)
            self._last_routed[k] = now
            self._own[k] = self._own.get(k, 0) + 1
            mk = (key[0], device_id, model_id)
            self._own_model[mk] = self._own_model.get(mk, 0) + 1

    def end(self, key: Key, model_id: str = "") -> None:
        for device_id in key[1].split("+"):
            k = (key[0], device_id)
            left = self._own.get(k, 0) - 1
            if left > 0:
                self._own[k] = left
            else:
                self._own.pop(k, None)
            mk = (key[0], device_id, model_id)
            left = self._own_model.get(mk, 0) - 1
            if left > 0:
                self._own_model[mk] = left
            else:
                self._own_model.pop(mk, None)
        self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    # -- reading -----------------------------------------------------------------------------

    def snapshot(self) -> RegistrySnapshot:
        # Shallow copies of three small dicts: the records themselves are immutable.
        return RegistrySnapshot(dict(self._nodes), dict(self._devices), dict(self._own),
                                self._clock(), dict(self._own_model), dict(self._last_routed))

    def node(self, node_id: str) -> NodeRecord | None:
        return self._nodes.get(node_id)

    def own_in_flight(self, key: Key) -> int:
        return self._own.get(key, 0)

    def count_by_state(self) -> dict[NodeState, int]:
        counts = dict.fromkeys(NodeState, 0)
        for node in self._nodes.values():
            counts[node.state] += 1
        return counts

    # -- internals ---------------------------------------------------------------------------

    def _with_models(self, node: NodeRecord, models: list[ModelStatus]) -> NodeRecord:
        fields = self._model_fields(node.node_id, models)
        return replace(node, models=fields[0], costs=fields[1], recent_requests=fields[2])

    def _model_fields(self, node_id: str, models: list[ModelStatus]
                      ) -> tuple[tuple[ModelStatus, ...], dict[str, ModelCost], dict[str, int]]:
        costs = {m.model_id: ModelCost(
            m.memory_need_mb,
            m.last_load_s if m.last_load_s is not None else self.default_load_s,
            service_s=m.service_s, devices=tuple(m.devices) if m.devices else None,
            split=tuple(m.split) if m.split else None, pinned=m.pinned, exclusive=m.exclusive,
            host_need_mb=m.host_memory_need_mb, allow_disk_paging=m.allow_disk_paging)
            for m in models}
        recent = {m.model_id: m.recent_requests for m in models}
        self.service.report(node_id, {m.model_id: m.service_s for m in models
                                      if m.service_s is not None})
        return tuple(models), costs, recent

    def _with_devices(self, node: NodeRecord, devices: list[DeviceStatus]) -> NodeRecord:
        return replace(node, device_ids=self._put_devices(node.node_id, devices))

    def _put_devices(self, node_id: str, devices: list[DeviceStatus]) -> tuple[str, ...]:
        """Record a node's reported devices; their ids, in its order."""
        own, own_model = self._own, self._own_model
        for d in devices:
            key = (node_id, d.device_id)
            others = max(0, d.in_flight + d.pending - own.get(key, 0))
            residents = tuple((i.model_id, i.state) for i in d.instances)
            model_others = {i.model_id: max(0, i.in_flight + i.queued - own_model.get(
                (*key, i.model_id), 0)) for i in d.instances}
            self._devices[key] = DeviceRecord(d, residents, d.in_flight, d.pending, others,
                                              model_others)
        return tuple(d.device_id for d in devices)

    def _drop_devices(self, node: NodeRecord | None,
                      keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Forget `node`'s devices (but those in `keep`): only its own, not a cluster scan."""
        if node is None:
            return
        for device_id in node.device_ids:
            if device_id not in keep:
                self._devices.pop((node.node_id, device_id), None)


# Free memory that rose by this much (something outside RoleMesh let go of it) may let a
# held request load there; smaller swings are allocator noise, and would wake the buffer on
# every heartbeat.
FREED_WAKES_MB = 256


def _may_admit_more(old: DeviceRecord | None, new: DeviceRecord) -> bool:
    """Whether a device's new report can let through a request that waited on the old
    one: its queue shrank or its limit rose, a model finished loading or stopped, a load
    failure's back-off ended, memory was freed, or it is new."""
    if old is None:
        return True
    was, now = old.status.memory_free_mb, new.status.memory_free_mb
    return (new.in_flight + new.pending < old.in_flight + old.pending
            or new.status.pending_limit > old.status.pending_limit
            or new.residents != old.residents
            or new.status.failed_models.keys() != old.status.failed_models.keys()
            or (was is not None and now is not None and now - was >= FREED_WAKES_MB))


def _served(node: NodeRecord) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """What a node serves, as far as name resolution cares: model ids and their roles."""
    return tuple((m.model_id, tuple(m.roles)) for m in node.models)
