"""From the registry to the decision's DeviceViews, and to the cluster inventory."""

from __future__ import annotations

from dispatcher.registry import Registry
from dispatcher.views import cluster_nodes, device_views
from rolemesh.api import (
    DeviceStatus,
    InstanceState,
    InstanceStatus,
    ModelStatus,
    NodeInventory,
    NodeState,
)
from rolemesh.decision import ModelCost, Reason, ResidentView, choose

S = InstanceState


class Clock:
    now = 500.0

    def __call__(self) -> float:
        return self.now


def device(device_id: str, **kw: object) -> DeviceStatus:
    fields: dict[str, object] = {"name": "GPU", "backend": "cuda", "memory_total_mb": 24000,
                                 "memory_used_mb": 0, "memory_free_mb": 24000}
    fields.update(kw)
    return DeviceStatus(device_id=device_id, **fields)  # type: ignore[arg-type]


def inst(model_id: str, state: InstanceState = S.READY, **kw: object) -> InstanceStatus:
    fields: dict[str, object] = {"devices": ["gpu:0"], "memory_charged_mb": 5000}
    fields.update(kw)
    return InstanceStatus(model_id=model_id, state=state, **fields)  # type: ignore[arg-type]


def models() -> list[ModelStatus]:
    return [ModelStatus(model_id="m1", roles=["planner"], file_size_mb=4000,
                        memory_need_mb=5000, last_load_s=3.0, recent_requests=4),
            ModelStatus(model_id="m2", roles=["coder"], file_size_mb=4000, memory_need_mb=6000)]


def registry_with(*nodes: tuple[str, list[DeviceStatus]], clock: Clock | None = None
                  ) -> Registry:
    registry = Registry(timeout_s=15, forget_s=60, default_load_s=5.0, clock=clock or Clock())
    for node_id, devices in nodes:
        registry.register(NodeInventory(node_id=node_id, url=f"http://{node_id}:8081",
                                        backend="cuda", seq=1, devices=devices,
                                        models=models()))
    return registry


def test_each_device_of_the_named_nodes_becomes_a_view_with_its_nodes_costs():
    registry = registry_with(
        ("node-a", [device("gpu:0", instances=[inst("m1", pinned=True)],
                           memory_free_mb=19000, pending_limit=4, mode="voice"), device("gpu:1")]),
        ("node-b", [device("cpu", memory_total_mb=None, memory_free_mb=None)]))
    views = device_views(registry.snapshot(), ["node-a", "node-b"])
    assert [v.key for v in views] == [("node-a", "gpu:0"), ("node-a", "gpu:1"),
                                      ("node-b", "cpu")]
    gpu0 = views[0]
    assert gpu0.residents == (ResidentView("m1", S.READY, charged_mb=5000, pinned=True),)
    assert gpu0.charged_mb == 5000
    assert gpu0.memory_total_mb == 24000
    assert gpu0.memory_free_mb == 19000
    assert gpu0.pending_limit == 4
    assert gpu0.up
    assert gpu0.servable == {"m1": ModelCost(5000, 3.0), "m2": ModelCost(6000, 5.0)}
    assert gpu0.recent_requests == {"m1": 4, "m2": 0}
    assert views[2].memory_total_mb is None


def test_a_view_carries_the_nodes_sets_held_mode_failures_and_draining():
    registry = Registry(timeout_s=15, forget_s=60, clock=Clock())
    registry.register(NodeInventory(
        node_id="node-a", url="http://a:8081", backend="cuda", seq=1,
        devices=[device("gpu:0", mode="voice", failed_models={"m2": 4.5})], models=models(),
        sets={"voice": ["m1", "m2"]}, draining=True))
    [view] = device_views(registry.snapshot(), ["node-a"])
    assert view.sets == {"voice": frozenset({"m1", "m2"})}
    assert view.held == frozenset({"m1", "m2"})
    assert view.failed == {"m2": 4.5}
    assert view.draining


def test_a_resident_is_busy_with_our_requests_for_it_plus_other_traffic_reported():
    registry = registry_with(("node-a", [device("gpu:0", in_flight=2, instances=[
        inst("m1", in_flight=1), inst("m2", in_flight=1, queued=1)])]))
    registry.begin(("node-a", "gpu:0"), "m1")
    [view] = device_views(registry.snapshot(), ["node-a"])
    assert {r.model_id: r.busy for r in view.residents} == {"m1": 2, "m2": 2}


def test_a_resident_seen_only_in_headers_is_charged_its_estimate():
    registry = registry_with(("node-a", [device("gpu:0")]))
    registry.observe(("node-a", "gpu:0"), (("m2", S.STARTING),), 1, 0)
    [view] = device_views(registry.snapshot(), ["node-a"])
    assert view.residents == (ResidentView("m2", S.STARTING, charged_mb=6000),)


def test_only_the_named_nodes_are_viewed_and_excluded_devices_are_left_out():
    registry = registry_with(("node-a", [device("gpu:0"), device("gpu:1")]),
                             ("node-b", [device("gpu:0")]))
    snap = registry.snapshot()
    assert [v.key for v in device_views(snap, ["node-b"])] == [("node-b", "gpu:0")]
    assert [v.key for v in device_views(snap, ["node-a"], exclude=[("node-a", "gpu:0")])] == \
        [("node-a", "gpu:1")]
    assert device_views(snap, ["node-z"]) == []


def test_a_down_node_gives_views_that_are_not_up():
    registry = registry_with(("node-a", [device("gpu:0")]))
    registry.mark_down("node-a", why="test")
    [view] = device_views(registry.snapshot(), ["node-a"])
    assert not view.up


def test_the_queue_is_the_dispatchers_own_count_plus_other_traffic_reported():
    registry = registry_with(("node-a", [device("gpu:0", in_flight=1, pending=1)]))
    key = ("node-a", "gpu:0")
    [view] = device_views(registry.snapshot(), ["node-a"])
    assert view.queue == 2  # two from elsewhere, none of ours
    registry.begin(key, "m1")
    registry.begin(key, "m1")
    [view] = device_views(registry.snapshot(), ["node-a"])
    assert view.queue == 4


def test_a_finished_request_stops_counting_before_the_next_report():
    registry = registry_with(("node-a", [device("gpu:0")]))
    key = ("node-a", "gpu:0")
    registry.begin(key, "m1")
    # A stream's first answer headers: the agent counts it, and so do we.
    registry.observe(key, (("m1", S.READY),), in_flight=1, pending=0)
    assert device_views(registry.snapshot(), ["node-a"])[0].queue == 1
    registry.end(key, "m1")  # the stream ends; no new report yet
    assert device_views(registry.snapshot(), ["node-a"])[0].queue == 0


def test_a_request_sent_but_not_yet_reported_counts_at_once():
    registry = registry_with(("node-a", [device("gpu:0", pending_limit=1)]))
    registry.begin(("node-a", "gpu:0"), "m1")
    decision = choose(["m1"], device_views(registry.snapshot(), ["node-a"]))
    assert decision.winner is None
    assert decision.verdicts[0].reason is Reason.AT_PENDING_LIMIT


def test_views_feed_the_decision_the_loaded_device_first():
    registry = registry_with(
        ("node-a", [device("gpu:0", instances=[inst("m2")])]),
        ("node-b", [device("gpu:0", instances=[inst("m1")])]))
    decision = choose(["m1"], device_views(registry.snapshot(), ["node-a", "node-b"]))
    assert decision.winner is not None
    assert decision.winner.node_id == "node-b"
    assert decision.winner.reason is Reason.MODEL_LOADED


def test_the_inventory_shows_observed_state_and_own_counts():
    clock = Clock()
    registry = registry_with(("node-a", [device("gpu:0")]), clock=clock)
    key = ("node-a", "gpu:0")
    registry.begin(key, "m1")
    registry.observe(key, (("m1", S.STARTING),), in_flight=1, pending=0)
    clock.now += 2.5
    [node] = cluster_nodes(registry.snapshot()).data
    assert node.state is NodeState.UP
    assert node.last_heartbeat_age_s == 2.5
    [dev] = node.devices
    assert [(i.model_id, i.state) for i in dev.status.instances] == [("m1", S.STARTING)]
    assert dev.status.in_flight == 1
    assert dev.status.memory_total_mb == 24000
    assert dev.dispatcher_in_flight == 1
