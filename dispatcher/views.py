"""Pure functions from a registry snapshot: the decision's DeviceViews and the inventory."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, MutableMapping

from dispatcher.registry import DeviceRecord, Key, NodeRecord, RegistrySnapshot
from rolemesh.api import ClusterDevice, ClusterNode, ClusterNodes, InstanceStatus, NodeState
from rolemesh.decision import DeviceView, ResidentView
from rolemesh.residency import split_need

ViewMemo = MutableMapping[Key, tuple[NodeRecord, DeviceRecord, int, DeviceView]]


def device_view(node: NodeRecord, record: DeviceRecord, own_in_flight: int,
                own_by_model: Mapping[tuple[str, str, str], int] | None = None,
                last_routed: float = 0.0) -> DeviceView:
    """One device as the decision sees it.

    Its queue is the dispatcher's own live count plus what the node last reported beyond
    the dispatcher's requests (`record.others`). Reported figures alone go stale between
    heartbeats (a request sent a millisecond ago is not in them; one that finished still
    is); the own count alone misses traffic from other clients. max(reported, own) would
    count a finished request until the next report; own + others does not, and it is exact
    for this dispatcher's share, which is what changes fastest. The sum is given as
    `in_flight` (with `pending` 0): the decision only uses their sum. A resident's load is
    counted the same way, per model.
    """
    status = record.status
    reported = {i.model_id: i for i in status.instances}
    own = own_by_model or {}
    residents = []
    for model_id, state in record.residents:
        inst = reported.get(model_id)
        cost = node.costs.get(model_id)
        busy = own.get((node.node_id, status.device_id, model_id), 0) + \
            record.model_others.get(model_id, 0)
        if inst is not None:
            residents.append(ResidentView(
                model_id, state, busy=busy, charged_mb=inst.memory_charged_mb,
                pinned=inst.pinned, exclusive=cost.exclusive if cost else False,
                devices=tuple(inst.devices) if len(inst.devices) > 1 else ()))
        else:  # seen in headers or routed by us, not yet in a report: charge its estimate
            devices = cost.devices if cost and cost.devices else (status.device_id,)
            share = (split_need(cost.memory_need_mb, devices, cost.split).get(
                status.device_id, 0) if cost else 0)
            residents.append(ResidentView(
                model_id, state, busy=busy, charged_mb=share,
                pinned=cost.pinned if cost else False,
                exclusive=cost.exclusive if cost else False,
                devices=devices if len(devices) > 1 else ()))
    held = node.sets.get(status.mode) if status.mode else None
    return DeviceView(
        node_id=node.node_id, device_id=status.device_id, servable=node.costs,
        memory_total_mb=status.memory_total_mb, memory_free_mb=status.memory_free_mb,
        residents=tuple(residents), in_flight=own_in_flight + record.others, pending=0,
        pending_limit=status.pending_limit, up=node.state is NodeState.UP,
        recent_requests=node.recent_requests, held=held, sets=node.sets,
        failed=status.failed_models, draining=node.draining,
        co_residency=node.co_residency, host_available_mb=node.host_memory_available_mb,
        last_routed=last_routed)


def device_views(snapshot: RegistrySnapshot, node_ids: Iterable[str],
                 exclude: Collection[Key] = (), memo: ViewMemo | None = None
                 ) -> list[DeviceView]:
    """The devices of `node_ids` as the decision sees them, less those in `exclude`.

    `memo`, when given, keeps each device's last view: records are immutable and replaced
    on change, so a view is reused while its node record, device record and own count are
    the same objects and number (the result is the same with or without it).
    """
    views: list[DeviceView] = []
    nodes = snapshot.nodes
    devices = snapshot.devices
    own_counts = snapshot.own_in_flight
    for node_id in node_ids:
        node = nodes.get(node_id)
        if node is None:
            continue
        for device_id in node.device_ids:
            key = (node_id, device_id)
            if key in exclude:
                continue
            record = devices.get(key)
            if record is None:
                continue
            own = own_counts.get(key, 0)
            routed = snapshot.last_routed.get(key, 0.0)
            if memo is None:
                views.append(device_view(node, record, own, snapshot.own_by_model, routed))
                continue
            hit = memo.get(key)
            if hit is not None and hit[0] is node and hit[1] is record and hit[2] == own \
                    and hit[3].last_routed == routed:
                views.append(hit[3])
                continue
            view = device_view(node, record, own, snapshot.own_by_model, routed)
            memo[key] = (node, record, own, view)
            views.append(view)
    return views


def cluster_node(snapshot: RegistrySnapshot, node: NodeRecord) -> ClusterNode:
    devices = []
    for device_id in node.device_ids:
        key = (node.node_id, device_id)
        d = snapshot.devices.get(key)
        if d is None:
            continue
        # The residents as last observed (headers, our own routing), not only as reported.
        reported = {i.model_id: i for i in d.status.instances}
        instances = [reported[m].model_copy(update={"state": state}) if m in reported
                     else InstanceStatus(model_id=m, devices=[device_id], state=state)
                     for m, state in d.residents]
        status = d.status.model_copy(update={"in_flight": d.in_flight, "pending": d.pending,
                                             "instances": instances})
        devices.append(ClusterDevice(node_id=node.node_id, status=status,
                                     dispatcher_in_flight=snapshot.own_in_flight.get(key, 0)))
    return ClusterNode(
        node_id=node.node_id, url=node.url, backend=node.backend, state=node.state,
        last_heartbeat_age_s=round(max(0.0, snapshot.now - node.last_seen), 3),
        registered_age_s=round(max(0.0, snapshot.now - node.registered_at), 3),
        devices=devices, models=list(node.models),
        sets={k: sorted(v) for k, v in node.sets.items()}, draining=node.draining,
        host_memory_total_mb=node.host_memory_total_mb,
        host_memory_available_mb=node.host_memory_available_mb,
        recent_stops=list(node.recent_stops))


def cluster_nodes(snapshot: RegistrySnapshot) -> ClusterNodes:
    return ClusterNodes(data=[cluster_node(snapshot, snapshot.nodes[n])
                              for n in sorted(snapshot.nodes)])
