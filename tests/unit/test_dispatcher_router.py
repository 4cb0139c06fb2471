"""The router: a decision without a winner becomes the error a client can act on."""

from __future__ import annotations

import pytest

from dispatcher.registry import Registry
from dispatcher.router import Router
from rolemesh.api import DeviceStatus, InstanceState, InstanceStatus, ModelStatus, NodeInventory
from rolemesh.decision import Action, Outcome, Policy
from rolemesh.errors import DeviceBusy, ModelDoesNotFit, ModelNotFound, NoNodeAvailable


def router(devices: list[DeviceStatus], need_mb: int = 5000,
           aliases: dict[str, str] | None = None) -> Router:
    registry = Registry(timeout_s=15, forget_s=60, clock=lambda: 0.0)
    registry.register(NodeInventory(
        node_id="node-a", url="http://a:8081", backend="cuda", seq=1, devices=devices,
        models=[ModelStatus(model_id="m1", roles=["planner"], file_size_mb=1,
                            memory_need_mb=need_mb)]))
    return Router(registry, aliases or {}, Policy(memory_safety_margin=0.9,
                                                  busy_retry_after_s=2.0))


def gpu(device_id: str = "gpu:0", total: int | None = 24000, **kw: object) -> DeviceStatus:
    return DeviceStatus(device_id=device_id, name="GPU", backend="cuda", memory_total_mb=total,
                        memory_used_mb=0, memory_free_mb=total, **kw)  # type: ignore[arg-type]


def m1_ready() -> list[InstanceStatus]:
    return [InstanceStatus(model_id="m1", devices=["gpu:0"], state=InstanceState.READY,
                           memory_charged_mb=5000)]


def test_a_routed_decision_names_the_winner_and_its_action():
    r = router([gpu(instances=m1_ready())])
    decision = r.decide(r.resolve("planner"))
    assert decision.outcome is Outcome.ROUTED
    assert decision.action is Action.USE_LOADED


def test_an_unknown_name_raises_model_not_found_listing_what_is_served():
    r = router([gpu()], aliases={"plan": "planner"})
    with pytest.raises(ModelNotFound) as err:
        r.resolve("writer")
    assert "'writer'" in err.value.message
    assert "m1, planner, plan" in err.value.message


def test_an_alias_of_an_unserved_role_says_so():
    r = router([gpu()], aliases={"write": "writer"})
    with pytest.raises(ModelNotFound) as err:
        r.resolve("write")
    assert "alias of 'writer'" in err.value.message


def test_fits_nowhere_names_the_need_and_the_largest_device():
    r = router([gpu("gpu:0", 16000), gpu("gpu:1", 24000)], need_mb=30000)
    decision = r.decide(r.resolve("planner"))
    assert decision.outcome is Outcome.FITS_NOWHERE
    err = r.error_for(decision, "planner")
    assert isinstance(err, ModelDoesNotFit)
    assert err.status == 422
    assert "30000 MB" in err.message
    assert "24000 MB" in err.message
    assert "21600 MB usable" in err.message


def test_all_busy_is_a_503_with_retry_after():
    r = router([gpu(instances=m1_ready(), in_flight=2, pending_limit=2)])
    decision = r.decide(r.resolve("m1"))
    assert decision.outcome is Outcome.ALL_BUSY
    err = r.error_for(decision, "m1")
    assert isinstance(err, DeviceBusy)
    assert err.headers["Retry-After"] == "2"


def test_all_down_is_a_503_with_retry_after():
    r = router([gpu()])
    r.registry.mark_down("node-a", why="test")
    decision = r.decide(r.resolve("m1"))
    assert decision.outcome is Outcome.ALL_DOWN
    err = r.error_for(decision, "m1")
    assert isinstance(err, NoNodeAvailable)
    assert err.status == 503
    assert "Retry-After" in err.headers


def test_no_candidates_left_is_model_not_found():
    r = router([gpu()])
    decision = r.decide(r.resolve("m1"), exclude=[("node-a", "gpu:0")])
    assert decision.outcome is Outcome.NO_CANDIDATES
    assert isinstance(r.error_for(decision, "m1"), ModelNotFound)


def test_explain_renders_each_candidate_and_the_error_a_request_would_get():
    r = router([gpu("gpu:0", 2000), gpu("gpu:1")])
    explained = r.explain("planner")
    assert explained["outcome"] == "routed"
    assert explained["kind"] == "role"
    assert [(c["device_id"], c["reason"], c["chosen"]) for c in explained["candidates"]] == [
        ("gpu:0", "does_not_fit", False), ("gpu:1", "fits_empty_device", True)]
    assert explained["error"] is None
    r.registry.mark_down("node-a", why="test")
    explained = r.explain("planner")
    assert explained["error"]["status"] == 503
    assert explained["error"]["code"] == "no_node_available"


def test_the_catalog_is_rebuilt_only_when_the_registry_changes():
    r = router([gpu()])
    first = r.catalog()
    assert r.catalog() is first
    r.registry.begin(("node-a", "gpu:0"), "m1")
    assert r.catalog() is first
    r.registry.mark_down("node-a", why="test")
    assert r.catalog() is not first
