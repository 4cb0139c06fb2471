"""The node registry: registrations, heartbeat ordering, expiry, comeback, live counts."""

from __future__ import annotations

import pytest

from dispatcher.registry import Change, Registry
from rolemesh.api import (
    DeviceStatus,
    HeartbeatRequest,
    InstanceState,
    InstanceStatus,
    ModelStatus,
    NodeInventory,
    NodeState,
    StopReason,
    StopRecord,
)
from rolemesh.decision import ModelCost
from rolemesh.errors import NodeNotFound

S = InstanceState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def device(device_id: str = "gpu:0", **kw: object) -> DeviceStatus:
    fields: dict[str, object] = {"name": "GPU", "backend": "cuda", "memory_total_mb": 24000,
                                 "memory_used_mb": 0, "memory_free_mb": 24000}
    fields.update(kw)
    return DeviceStatus(device_id=device_id, **fields)  # type: ignore[arg-type]


def instance(model_id: str = "m1", state: InstanceState = S.READY, **kw: object
             ) -> InstanceStatus:
    fields: dict[str, object] = {"devices": ["gpu:0"], "memory_charged_mb": 5000}
    fields.update(kw)
    return InstanceStatus(model_id=model_id, state=state, **fields)  # type: ignore[arg-type]


def model(model_id: str = "m1", **kw: object) -> ModelStatus:
    fields: dict[str, object] = {"roles": ["planner"], "file_size_mb": 4000,
                                 "memory_need_mb": 5000}
    fields.update(kw)
    return ModelStatus(model_id=model_id, **fields)  # type: ignore[arg-type]


def inventory(node_id: str = "node-a", seq: int = 1, devices: list[DeviceStatus] | None = None,
              models: list[ModelStatus] | None = None) -> NodeInventory:
    return NodeInventory(node_id=node_id, url="http://10.0.0.1:8081/", backend="cuda", seq=seq,
                         devices=devices or [device()], models=models or [model()])


def beat(node_id: str = "node-a", seq: int = 2, devices: list[DeviceStatus] | None = None,
         models: list[ModelStatus] | None = None) -> HeartbeatRequest:
    return HeartbeatRequest(node_id=node_id, seq=seq, devices=devices or [device()],
                            models=models)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> Registry:
    return Registry(timeout_s=15.0, forget_s=60.0, default_load_s=5.0, clock=clock)


def test_a_registered_node_is_up_with_its_devices_models_and_costs(registry):
    node = registry.register(inventory(models=[model("m1", last_load_s=2.5), model("m2")]))
    assert node.state is NodeState.UP
    assert node.url == "http://10.0.0.1:8081"
    assert node.device_ids == ("gpu:0",)
    assert node.costs == {"m1": ModelCost(5000, 2.5), "m2": ModelCost(5000, 5.0)}
    snap = registry.snapshot()
    assert snap.devices[("node-a", "gpu:0")].status.memory_total_mb == 24000


def test_a_models_measured_service_time_reaches_its_cost_and_none_leaves_the_default(
        registry):
    node = registry.register(inventory(models=[model("m1", service_s=26.5), model("m2")]))
    assert node.costs["m1"].service_s == 26.5
    assert node.costs["m2"].service_s is None  # the decision's default_service_s


def test_the_registry_keeps_each_models_service_time_over_the_nodes_that_measured_it(
        registry, clock):
    # What a node that has not measured a model yet is priced at (choose(measured=...)).
    registry.register(inventory("node-a", models=[model("m1", service_s=2.0), model("m2")]))
    registry.register(inventory("node-b", models=[model("m1", service_s=4.0)]))
    registry.register(inventory("node-c", models=[model("m1")]))
    assert registry.service.means(["m1", "m2", "m9"]) == {"m1": 3.0}  # m2: nobody has
    # A heartbeat's models replace the node's figures.
    assert registry.heartbeat(beat("node-b", models=[model("m1", service_s=8.0),
                                                     model("m2", service_s=1.0)]))
    assert registry.service.means(["m1", "m2"]) == {"m1": 5.0, "m2": 1.0}
    assert registry.heartbeat(beat("node-c", models=[model("m1", service_s=5.0)]))
    assert registry.service.means(["m1"]) == {"m1": 5.0}
    # A node that left takes its figures with it, whether it said so or fell silent.
    assert registry.forget("node-b", "deregistered")
    assert registry.service.means(["m1", "m2"]) == {"m1": 3.5}
    clock.now += 61.0
    registry.heartbeat(beat("node-a", seq=5, models=[model("m1", service_s=2.0)]))
    registry.expire()  # node-c is forgotten
    assert registry.service.means(["m1"]) == {"m1": 2.0}


def test_a_newer_heartbeat_replaces_the_devices_and_keeps_models_when_it_has_none(registry):
    registry.register(inventory())
    assert registry.heartbeat(beat(seq=2, devices=[device(instances=[
        instance("m1"), instance("m2", S.STARTING)])]))
    snap = registry.snapshot()
    assert snap.devices[("node-a", "gpu:0")].residents == (("m1", S.READY),
                                                           ("m2", S.STARTING))
    assert snap.nodes["node-a"].seq == 2
    assert [m.model_id for m in snap.nodes["node-a"].models] == ["m1"]


def test_a_registration_carries_the_lifecycle_of_models_sets_and_stops(registry):
    node = registry.register(NodeInventory(
        node_id="node-a", url="http://10.0.0.1:8081", backend="cuda",
        devices=[device("gpu:0"), device("gpu:1")],
        models=[model("big", devices=["gpu:0", "gpu:1"], split=[1.0, 1.5], exclusive=True),
                model("emb", pinned=True)],
        sets={"voice": ["m1", "emb"]}, draining=True,
        recent_stops=[StopRecord(model_id="m1", devices=["gpu:0"], reason=StopReason.TTL,
                                 age_s=3.0)]))
    assert node.costs["big"] == ModelCost(5000, 5.0, devices=("gpu:0", "gpu:1"),
                                          split=(1.0, 1.5), exclusive=True)
    assert node.costs["emb"].pinned
    assert node.sets == {"voice": frozenset({"m1", "emb"})}
    assert node.draining
    assert [s.reason for s in node.recent_stops] == [StopReason.TTL]


def test_a_heartbeat_says_when_a_node_drains_and_undrains(registry):
    registry.register(inventory())
    v = registry.version
    registry.heartbeat(beat(seq=2).model_copy(update={"draining": True}))
    assert registry.node("node-a").draining
    assert registry.version > v
    registry.set_draining("node-a", False)
    assert not registry.node("node-a").draining


def test_a_heartbeat_with_models_replaces_them(registry):
    registry.register(inventory())
    registry.heartbeat(beat(seq=2, models=[model("m1", recent_requests=7), model("m3")]))
    node = registry.node("node-a")
    assert [m.model_id for m in node.models] == ["m1", "m3"]
    assert node.recent_requests == {"m1": 7, "m3": 0}


def test_an_older_or_repeated_heartbeat_is_dropped(registry):
    registry.register(inventory(seq=5))
    assert registry.heartbeat(beat(seq=6, devices=[device(in_flight=1)]))
    assert not registry.heartbeat(beat(seq=6, devices=[device(in_flight=2)]))
    assert not registry.heartbeat(beat(seq=3, devices=[device(in_flight=2)]))
    assert registry.snapshot().devices[("node-a", "gpu:0")].in_flight == 1
    assert registry.node("node-a").seq == 6


def test_a_registration_starts_the_seq_again_for_a_restarted_agent(registry):
    registry.register(inventory(seq=50))
    registry.register(inventory(seq=1))
    assert registry.heartbeat(beat(seq=2))


def test_a_heartbeat_from_an_unknown_node_raises_node_not_found(registry):
    with pytest.raises(NodeNotFound):
        registry.heartbeat(beat("node-z"))


def test_a_device_missing_from_a_heartbeat_is_dropped(registry):
    registry.register(inventory(devices=[device("gpu:0"), device("gpu:1")]))
    registry.heartbeat(beat(seq=2, devices=[device("gpu:1")]))
    assert registry.node("node-a").device_ids == ("gpu:1",)
    assert ("node-a", "gpu:0") not in registry.snapshot().devices


def test_a_silent_node_goes_down_after_the_timeout_then_is_forgotten(registry, clock):
    registry.register(inventory())
    clock.now += 14.9
    assert registry.expire() == []
    clock.now += 0.2
    assert registry.expire() == [Change("node-a", "down")]
    assert registry.node("node-a").state is NodeState.DOWN
    assert registry.expire() == []  # reported once
    clock.now += 45.0
    assert registry.expire() == [Change("node-a", "forgotten")]
    assert registry.node("node-a") is None
    assert registry.snapshot().devices == {}
    with pytest.raises(NodeNotFound):
        registry.heartbeat(beat(seq=9))


def test_a_down_node_is_up_again_with_its_next_heartbeat(registry, clock):
    registry.register(inventory())
    clock.now += 20
    registry.expire()
    assert registry.node("node-a").state is NodeState.DOWN
    assert registry.heartbeat(beat(seq=2))
    assert registry.node("node-a").state is NodeState.UP
    assert registry.node("node-a").last_seen == clock.now


def test_heartbeats_keep_a_node_up(registry, clock):
    registry.register(inventory())
    for seq in range(2, 10):
        clock.now += 10
        registry.heartbeat(beat(seq=seq))
        assert registry.expire() == []


def test_mark_down_stops_routing_until_the_next_heartbeat(registry):
    registry.register(inventory())
    version = registry.version
    assert registry.mark_down("node-a", why="refused")
    assert not registry.mark_down("node-a", why="refused")
    assert registry.node("node-a").state is NodeState.DOWN
    assert registry.version > version
    registry.heartbeat(beat(seq=2))
    assert registry.node("node-a").state is NodeState.UP


def test_the_own_count_rises_and_falls_and_never_goes_below_zero(registry):
    key = ("node-a", "gpu:0")
    registry.begin(key, "m1")
    registry.begin(key, "m2")
    assert registry.own_in_flight(key) == 2
    assert registry.snapshot().own_by_model == {("node-a", "gpu:0", "m1"): 1,
                                                ("node-a", "gpu:0", "m2"): 1}
    registry.end(key, "m1")
    registry.end(key, "m2")
    registry.end(key, "m2")
    assert registry.own_in_flight(key) == 0
    assert registry.snapshot().own_in_flight == {}
    assert registry.snapshot().own_by_model == {}


def test_a_request_to_a_group_counts_on_every_device_of_it(registry):
    registry.begin(("node-a", "gpu:0+gpu:1"), "big")
    assert registry.own_in_flight(("node-a", "gpu:0")) == 1
    assert registry.own_in_flight(("node-a", "gpu:1")) == 1
    registry.end(("node-a", "gpu:0+gpu:1"), "big")
    assert registry.snapshot().own_in_flight == {}


def test_own_requests_survive_the_node_being_forgotten(registry, clock):
    registry.register(inventory())
    registry.begin(("node-a", "gpu:0"), "m1")
    clock.now += 100
    registry.expire()
    registry.end(("node-a", "gpu:0"), "m1")  # a long stream ending after the node went: no error
    assert registry.own_in_flight(("node-a", "gpu:0")) == 0


def test_observed_headers_update_the_device_and_split_off_other_traffic(registry):
    registry.register(inventory())
    key = ("node-a", "gpu:0")
    registry.begin(key, "m1")
    registry.observe(key, (("m1", S.READY), ("m2", S.STARTING)), in_flight=3, pending=1)
    d = registry.snapshot().devices[key]
    assert (d.residents, d.in_flight, d.pending) == ((("m1", S.READY), ("m2", S.STARTING)), 3, 1)
    assert d.others == 3  # four reported, one of them ours
    registry.observe(("node-z", "gpu:0"), (("m1", S.READY),), 0, 0)  # unknown: ignored


def test_a_heartbeat_splits_off_other_traffic_the_same_way(registry):
    registry.register(inventory())
    key = ("node-a", "gpu:0")
    registry.begin(key, "m1")
    registry.begin(key, "m1")
    registry.heartbeat(beat(seq=2, devices=[device(in_flight=1)]))
    assert registry.snapshot().devices[key].others == 0


def test_a_heartbeat_splits_off_other_traffic_per_resident_model(registry):
    registry.register(inventory())
    key = ("node-a", "gpu:0")
    registry.begin(key, "m1")
    registry.heartbeat(beat(seq=2, devices=[device(in_flight=3, instances=[
        instance("m1", in_flight=2), instance("m2", in_flight=1, queued=1)])]))
    assert registry.snapshot().devices[key].model_others == {"m1": 1, "m2": 2}


def test_expect_marks_the_device_as_starting_the_model_it_was_sent(registry):
    registry.register(inventory())
    key = ("node-a", "gpu:0")
    registry.expect(key, "m1")
    assert registry.snapshot().devices[key].residents == (("m1", S.STARTING),)
    registry.expect(key, "m1")  # already expected: listed once
    registry.expect(key, "m2")  # beside it
    assert registry.snapshot().devices[key].residents == (("m1", S.STARTING),
                                                          ("m2", S.STARTING))


def test_the_version_rises_on_what_the_cluster_serves_not_on_requests_or_figures(
        registry, clock):
    v0 = registry.version
    registry.register(inventory())
    v1 = registry.version
    assert v1 > v0
    registry.begin(("node-a", "gpu:0"), "m1")
    registry.observe(("node-a", "gpu:0"), (("m1", S.READY),), 1, 0)
    registry.end(("node-a", "gpu:0"), "m1")
    assert registry.version == v1
    registry.heartbeat(beat(seq=2))  # fresh figures, same devices and models
    assert registry.version == v1
    registry.heartbeat(beat(seq=3, devices=[device(), device("gpu:1")]))  # a new device
    v2 = registry.version
    assert v2 > v1
    registry.heartbeat(beat(seq=4, devices=[device(), device("gpu:1")],
                            models=[ModelStatus(model_id="m9", roles=["chat"], file_size_mb=1,
                                                memory_need_mb=2)]))  # other models
    v3 = registry.version
    assert v3 > v2
    clock.now += 20
    registry.expire()  # down
    v4 = registry.version
    assert v4 > v3
    registry.heartbeat(beat(seq=5, devices=[device(), device("gpu:1")]))  # up again
    assert registry.version > v4


def test_count_by_state(registry, clock):
    registry.register(inventory("node-a"))
    clock.now += 20
    registry.register(inventory("node-b"))
    registry.expire()
    assert registry.count_by_state() == {NodeState.UP: 1, NodeState.DOWN: 1}


@pytest.mark.parametrize(("what", "before", "after", "wakes"), [
    ("figures only", device(in_flight=2, pending=1, memory_used_mb=9000),
     device(in_flight=2, pending=1, memory_used_mb=9100), False),
    ("its queue grew", device(in_flight=1), device(in_flight=2, pending=1), False),
    ("its queue shrank", device(in_flight=2, pending=1), device(in_flight=2), True),
    ("its limit rose", device(in_flight=4, pending_limit=4),
     device(in_flight=4, pending_limit=8), True),
    ("a load finished", device(instances=[instance(state=S.STARTING)]),
     device(instances=[instance()]), True),
    ("a model stopped", device(instances=[instance()]), device(instances=[]), True),
    ("a back-off ended", device(failed_models={"m1": 3.0}), device(), True),
    ("a back-off ticked", device(failed_models={"m1": 3.0}),
     device(failed_models={"m1": 1.0}), False),
    ("memory freed outside RoleMesh", device(memory_used_mb=20000, memory_free_mb=4000),
     device(memory_used_mb=8000, memory_free_mb=16000), True),
    ("free memory wobbled", device(memory_used_mb=8000, memory_free_mb=16000),
     device(memory_used_mb=7900, memory_free_mb=16100), False),
    ("memory taken", device(memory_free_mb=16000), device(memory_free_mb=4000), False),
])
def test_a_heartbeat_tells_the_buffer_only_what_may_let_a_held_request_through(
        registry, what, before, after, wakes):
    woken: list[int] = []
    registry.listeners.append(lambda: woken.append(1))
    registry.register(inventory(devices=[before]))
    woken.clear()
    registry.heartbeat(beat(devices=[after]))
    assert bool(woken) is wakes, what


def test_a_heartbeat_that_brings_a_node_back_or_undrains_it_wakes_the_buffer(registry):
    woken: list[int] = []
    registry.listeners.append(lambda: woken.append(1))
    registry.register(inventory())
    registry.mark_down("node-a", "refused")
    woken.clear()
    registry.heartbeat(beat(seq=2))
    assert woken
    registry.heartbeat(HeartbeatRequest(node_id="node-a", seq=3, devices=[device()],
                                        draining=True))
    woken.clear()
    registry.heartbeat(beat(seq=4))
    assert woken
