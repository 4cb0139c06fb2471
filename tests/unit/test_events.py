"""The event hub: diffs of successive node reports (schema v2), and bounded subscribers."""

from __future__ import annotations

import asyncio

from dispatcher.events import EventHub, diff_devices, instances_of, sse_message
from rolemesh.api import DeviceStatus, InstanceState, InstanceStatus, StopReason, StopRecord


def device(device_id: str = "gpu:0", model: str | None = None,
           state: InstanceState = InstanceState.READY, **kw: object) -> DeviceStatus:
    """A device as the wire carries it: one instance of `model` (or none) in `state`."""
    instances = [] if model is None else [
        InstanceStatus(model_id=model, devices=[device_id], state=state, **kw)]
    return DeviceStatus(device_id=device_id, name="x", backend="cuda", memory_total_mb=24000,
                        memory_used_mb=0, memory_free_mb=24000, instances=instances)


def stop(model: str, reason: StopReason, detail: str | None = None) -> StopRecord:
    return StopRecord(model_id=model, devices=["gpu:0"], reason=reason, detail=detail,
                      age_s=0.1)


def v2(device: str, *instances: dict) -> dict:
    return {"device_id": device, "memory_total_mb": 24000, "memory_charged_mb": 0,
            "instances": list(instances)}


def inst(model: str, state: str, **kw: object) -> dict:
    return {"model_id": model, "state": state, **kw}


def types(changes: list) -> list[tuple[str, str | None, str | None]]:
    return [(t, d.get("model_id"), d.get("new") or d.get("reason")) for t, d in changes]


def test_a_device_that_loads_a_model_reports_starting_then_ready_and_loaded():
    memory, first = diff_devices("n", None, [device()], None)
    assert first == []
    memory, starting = diff_devices("n", memory, [device(model="a",
                                                         state=InstanceState.STARTING)], None)
    assert types(starting) == [("instance.state", "a", "starting")]
    _, ready = diff_devices("n", memory, [device(model="a", last_load_s=1.5)], None)
    assert types(ready) == [("instance.state", "a", "ready"), ("model.loaded", "a", None)]
    assert ready[1][1]["load_s"] == 1.5


def test_a_switch_reads_as_the_old_model_evicted_for_the_new_one_as_the_node_says():
    memory, _ = diff_devices("n", None, [device(model="a")], None)
    _, changes = diff_devices("n", memory, [device(model="b", state=InstanceState.STARTING)],
                              [stop("a", StopReason.EVICTED_FOR, "b")])
    stopped = [d for t, d in changes if t == "model.stopped"]
    assert len(stopped) == 1
    assert stopped[0]["model_id"] == "a"
    assert stopped[0]["reason"] == "evicted_for"
    assert stopped[0]["detail"] == "b"
    assert ("instance.state", "a", "empty") in types(changes)


def test_a_crash_reads_as_crash_with_its_exit_code():
    memory, _ = diff_devices("n", None, [device(model="a")], None)
    _, changes = diff_devices("n", memory, [device()],
                              [stop("a", StopReason.CRASH, "exit code 139")])
    assert ("model.stopped", "a", "crash") in types(changes)
    assert next(d for t, d in changes if t == "model.stopped")["detail"] == "exit code 139"


def test_v2_instances_and_their_stop_records_name_the_reason():
    memory, changes = diff_devices("n", None, [v2("gpu:0", inst("a", "ready"),
                                                   inst("b", "starting"))], None)
    assert sorted(types(changes)) == [("instance.state", "a", "ready"),
                                      ("instance.state", "b", "starting"),
                                      ("model.loaded", "a", None)]
    stops = [{"model_id": "a", "devices": ["gpu:0"], "reason": "ttl", "detail": None,
              "age_s": 0.5}]
    memory, changes = diff_devices("n", memory, [v2("gpu:0", inst("b", "ready"))], stops)
    assert ("model.stopped", "a", "ttl") in types(changes)
    assert ("model.loaded", "b", None) in types(changes)
    # The same record again (older now) is not a second stop.
    stops[0]["age_s"] = 2.5
    _, again = diff_devices("n", memory, [v2("gpu:0", inst("b", "ready"))], stops)
    assert again == []


def test_a_v2_model_split_over_two_devices_is_one_instance():
    group = {"devices": ["gpu:0", "gpu:1"]}
    found = instances_of([v2("gpu:0", inst("big", "ready", **group)),
                          v2("gpu:1", inst("big", "ready", **group))])
    assert list(found) == [(("gpu:0", "gpu:1"), "big")]


def test_a_stop_the_hub_never_saw_running_still_becomes_an_event():
    memory, _ = diff_devices("n", None, [v2("gpu:0")], None)
    stops = [{"model_id": "c", "devices": ["gpu:0"], "reason": "crash", "detail": "exit 1",
              "age_s": 0.1}]
    _, changes = diff_devices("n", memory, [v2("gpu:0")], stops)
    assert types(changes) == [("model.stopped", "c", "crash")]


def test_v2_restarts_rising_read_as_a_crash_of_a_live_instance():
    memory, _ = diff_devices("n", None, [v2("gpu:0", inst("a", "ready", restarts=0))], None)
    _, changes = diff_devices("n", memory, [v2("gpu:0", inst("a", "ready", restarts=1,
                                                            last_error="exit 139"))], None)
    assert types(changes) == [("model.stopped", "a", "crash")]


def hub(**kw: object) -> EventHub:
    return EventHub(lambda: {"nodes": []}, wall_clock=lambda: 1000.0, **kw)  # type: ignore[arg-type]


def test_node_up_comes_once_and_again_after_down():
    h = hub()
    assert [e.type for e in h.node_report("n", [device()])] == ["node.up"]
    assert h.node_report("n", [device()]) == []
    assert h.node_gone("n", "down", "missed heartbeats").type == "node.down"
    assert h.node_gone("n", "down", "again") is None
    assert [e.type for e in h.node_report("n", [device()])] == ["node.up"]


async def test_a_subscriber_gets_a_snapshot_then_each_event():
    h = hub()
    h.request_done(name="chat", outcome="ok")
    with h.subscribe() as sub:
        stream = h.stream(sub, keepalive_s=5)
        snap = await anext(stream)
        assert snap["type"] == "snapshot"
        assert [e["type"] for e in snap["recent"]] == ["request.done"]
        h.node_report("n", [device(model="a")])
        got = [(await anext(stream))["type"] for _ in range(3)]
        assert got == ["node.up", "instance.state", "model.loaded"]
    assert h.subscribers == 0


async def test_a_slow_subscriber_skips_to_a_fresh_snapshot_instead_of_piling_up():
    h = hub(queue_limit=4)
    with h.subscribe() as sub:
        stream = h.stream(sub, keepalive_s=5)
        assert (await anext(stream))["type"] == "snapshot"
        for i in range(10):
            h.request_done(name=f"r{i}", outcome="ok")
        assert sub.queue.qsize() <= 4
        assert sub.dropped >= 1
        again = await anext(stream)
        assert again["type"] == "snapshot"  # what it missed is in the snapshot's recent list
        assert [e["name"] for e in again["recent"]][-1] == "r9"
        h.request_done(name="after", outcome="ok")
        nxt = await anext(stream)  # nothing the snapshot held comes twice
        assert nxt["name"] == "after"


async def test_an_idle_stream_yields_keepalives():
    h = hub()
    with h.subscribe() as sub:
        stream = h.stream(sub, keepalive_s=0.01)
        await anext(stream)
        assert await asyncio.wait_for(anext(stream), 5) is None


def test_sse_messages_carry_the_type_and_id():
    text = sse_message({"type": "node.up", "id": 7, "node_id": "n"}).decode()
    assert text.startswith("event: node.up\nid: 7\ndata: {")
    assert text.endswith("\n\n")


def test_a_v2_stop_without_a_record_is_unknown_not_guessed():
    memory, _ = diff_devices("n", None, [v2("gpu:0", inst("a", "ready"))], None)
    _, changes = diff_devices("n", memory, [v2("gpu:0", inst("b", "ready"))], None)
    stopped = [d for t, d in changes if t == "model.stopped"]
    assert [(d["model_id"], d["reason"]) for d in stopped] == [("a", "unknown")]
