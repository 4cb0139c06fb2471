"""`choose()` over devices that hold sets of models: one table test per rule, and invariants."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from rolemesh.api import InstanceState as S
from rolemesh.decision import (
    Action,
    DeviceView,
    ModelCost,
    Outcome,
    Reason,
    ResidentView,
    choose,
)

COSTS = {
    "chat": ModelCost(4_000, load_s=2.0),
    "think": ModelCost(6_000, load_s=4.0),
    "coder": ModelCost(18_000, load_s=10.0),
    "big": ModelCost(20_000, load_s=30.0, devices=("gpu:0", "gpu:1"), exclusive=True),
    "embed": ModelCost(1_000, load_s=1.0, pinned=True),
}


def r(model: str, *, busy: int = 0, state: S = S.READY, share: int | None = None,
      devices: tuple[str, ...] = ()) -> ResidentView:
    cost = COSTS[model]
    return ResidentView(model, state, busy=busy,
                        charged_mb=share if share is not None else cost.memory_need_mb,
                        pinned=cost.pinned, exclusive=cost.exclusive, devices=devices)


def dev(device_id: str = "gpu:0", *, node: str = "a", total: int = 24_000,
        residents: Sequence[ResidentView] = (), queue: int = 0, limit: int = 4,
        recent: Mapping[str, int] | None = None, **kw: object) -> DeviceView:
    return DeviceView(node_id=node, device_id=device_id, servable=COSTS, memory_total_mb=total,
                      residents=tuple(residents), in_flight=queue, pending_limit=limit,
                      recent_requests=dict(recent or {}), **kw)  # type: ignore[arg-type]


def where(models: Sequence[str], devices: Sequence[DeviceView]) -> tuple[str, str, Action]:
    d = choose(models, devices)
    assert d.winner is not None, d.explain()
    assert d.action is not None, d.explain()
    return (f"{d.winner.node_id}/{d.winner.device_id}", d.winner.model_id, d.action)


def test_a_model_resident_beside_others_is_used_and_nothing_loads():
    devices = [dev(residents=[r("chat"), r("think")]), dev("gpu:1")]
    assert where(["think"], devices) == ("a/gpu:0", "think", Action.USE_LOADED)


def test_a_model_that_fits_beside_residents_loads_there_without_evicting():
    d = choose(["think"], [dev(residents=[r("chat")])])
    assert d.action is Action.LOAD_BESIDE
    assert d.winner is not None
    assert d.winner.evicts == ()


def test_best_fit_keeps_the_big_device_free_for_what_only_it_can_hold():
    devices = [dev("gpu:0", total=48_000), dev("gpu:1", total=8_000)]
    assert where(["chat"], devices) == ("a/gpu:1", "chat", Action.LOAD_ON_EMPTY)


def test_a_device_whose_residents_are_busy_is_a_worse_neighbour_than_an_idle_one():
    devices = [dev("gpu:0", residents=[r("think", busy=2)], queue=2),
               dev("gpu:1", residents=[r("think")], node="b")]
    assert where(["chat"], devices) == ("b/gpu:1", "chat", Action.LOAD_BESIDE)


def test_when_nothing_fits_the_cheapest_idle_set_is_evicted_and_named():
    devices = [dev(total=24_000, residents=[r("chat"), r("think")],
                   recent={"chat": 10, "think": 1})]
    d = choose(["coder"], devices)
    assert d.action is Action.EVICT
    assert d.winner is not None
    assert d.winner.evicts == ("chat", "think")  # 18,000 needs both gone on 21,600 usable
    assert d.winner.eviction_cost == 10 * 2.0 + 1 * 4.0


def test_a_busy_resident_is_never_evicted_the_request_waits_behind_it():
    d = choose(["coder"], [dev(residents=[r("think", busy=1)], queue=1)])
    assert d.action is Action.SWITCH_AFTER_QUEUE
    assert d.winner is not None
    assert d.winner.reason is Reason.SWITCH_AFTER_QUEUE
    assert d.winner.evicts == ("think",)


def test_pinned_residents_leave_no_room_and_the_verdict_says_so():
    d = choose(["coder"], [dev(total=20_000, residents=[r("embed")])])
    assert d.outcome is Outcome.ALL_BUSY
    (v,) = d.verdicts
    assert v.reason is Reason.NO_ROOM
    assert "pinned" in (v.note or "")


def test_a_group_model_is_placed_on_its_whole_group_as_one_unit():
    devices = [dev("gpu:0", total=12_000, residents=[r("chat")]),
               dev("gpu:1", total=12_000, residents=[r("think")])]
    d = choose(["big"], devices)
    assert d.winner is not None
    assert d.winner.device_id == "gpu:0+gpu:1"
    assert d.action is Action.EVICT
    assert d.winner.evicts == ("chat", "think")


def test_a_group_instance_resident_on_both_gpus_is_used():
    both = ("gpu:0", "gpu:1")
    devices = [dev("gpu:0", total=12_000, residents=[r("big", share=10_000, devices=both)]),
               dev("gpu:1", total=12_000, residents=[r("big", share=10_000, devices=both)])]
    assert where(["big"], devices) == ("a/gpu:0+gpu:1", "big", Action.USE_LOADED)


def test_a_device_held_for_another_set_is_not_a_candidate():
    devices = [dev("gpu:0", held=frozenset({"think"})), dev("gpu:1", node="b")]
    d = choose(["chat"], devices)
    assert d.winner is not None
    assert d.winner.node_id == "b"
    held = [v for v in d.verdicts if v.node_id == "a"]
    assert held[0].reason is Reason.HELD_FOR_SET


def test_a_model_that_failed_to_load_is_avoided_during_its_backoff():
    devices = [dev("gpu:0", failed={"chat": 4.0}), dev("gpu:1", node="b", total=8_000)]
    assert where(["chat"], devices)[0] == "b/gpu:1"
    d = choose(["chat"], [dev("gpu:0", failed={"chat": 4.0})])
    assert d.outcome is Outcome.ALL_BUSY
    assert d.verdicts[0].reason is Reason.RECENTLY_FAILED


def test_a_draining_node_gets_nothing_new():
    d = choose(["chat"], [dev(residents=[r("chat")], draining=True)])
    assert d.outcome is Outcome.ALL_BUSY
    assert d.verdicts[0].reason is Reason.NODE_DRAINING


def test_an_exclusive_resident_must_leave_for_a_model_that_would_fit_beside_it():
    devices = [dev("gpu:0", total=12_000, residents=[r("big", share=10_000,
                                                      devices=("gpu:0", "gpu:1"))]),
               dev("gpu:1", total=12_000, residents=[r("big", share=10_000,
                                                      devices=("gpu:0", "gpu:1"))])]
    d = choose(["chat"], devices)
    assert d.action is Action.EVICT
    assert d.winner is not None
    assert d.winner.evicts == ("big",)


def test_with_co_residency_off_a_second_model_is_a_switch():
    d = choose(["chat"], [dev(residents=[r("think")], co_residency=False)])
    assert d.action is Action.EVICT
    assert d.winner is not None
    assert d.winner.evicts == ("think",)


def test_a_copy_elsewhere_makes_evicting_this_one_free():
    devices = [dev("gpu:0", total=20_000, residents=[r("think")], recent={"think": 50}),
               dev("gpu:0", node="b", residents=[r("think")], recent={"think": 50}, queue=3,
                   limit=3)]
    d = choose(["coder"], devices)
    assert d.winner is not None
    assert d.winner.node_id == "a"
    assert d.winner.eviction_cost == 0.0


# -- invariants over generated clusters ------------------------------------------------------

MODELS = ("chat", "think", "coder", "embed")


@st.composite
def clusters(draw: st.DrawFn) -> list[DeviceView]:
    out = []
    for i in range(draw(st.integers(1, 5))):
        total = draw(st.sampled_from([8_000, 12_000, 24_000, 48_000]))
        residents, used = [], 0
        for m in draw(st.lists(st.sampled_from(MODELS), unique=True, max_size=3)):
            need = COSTS[m].memory_need_mb
            if used + need <= total * 0.9:
                used += need
                residents.append(r(m, busy=draw(st.integers(0, 2)),
                                   state=draw(st.sampled_from([S.READY, S.STARTING]))))
        queue = sum(x.busy for x in residents)
        out.append(dev(f"gpu:{i}", node=f"n{i % 2}", total=total, residents=residents,
                       queue=queue, limit=draw(st.integers(1, 4)),
                       recent={m: draw(st.integers(0, 9)) for m in MODELS},
                       up=draw(st.booleans()) or i == 0))
    return out


@settings(max_examples=500, deadline=None)
@given(clusters(), st.sampled_from(MODELS))
def test_the_winner_is_eligible_never_evicts_busy_or_pinned_and_order_does_not_matter(
        devices, model):
    d = choose([model], devices)
    again = choose([model], list(reversed(devices)))
    assert (d.winner and (d.winner.node_id, d.winner.device_id, d.winner.model_id)) == (
        again.winner and (again.winner.node_id, again.winner.device_id, again.winner.model_id))
    if d.winner is None:
        return
    (chosen,) = [v for v in d.verdicts if v.chosen]
    assert chosen == d.winner
    view = next(v for v in devices if (v.node_id, v.device_id) == (chosen.node_id,
                                                                    chosen.device_id))
    assert view.up
    assert view.queue < view.pending_limit
    resident = {x.model_id: x for x in view.residents}
    if d.action is Action.EVICT:
        assert all(not resident[m].busy and not resident[m].pinned for m in chosen.evicts)
    if d.action is not Action.USE_LOADED:
        # A ready copy with nothing queued would have won (a queued one may lose to a
        # new copy elsewhere: the cost model, tests/unit/test_decision_pressure.py).
        assert not any(x.model_id == model and x.state is S.READY for v in devices
                       for x in v.residents if v.up and v.queue == 0)


def test_a_placement_whose_host_ram_part_does_not_fit_is_refused_unless_paging_is_allowed():
    moe = {"moe": ModelCost(6_400, 60.0, host_need_mb=139_408)}
    node = DeviceView(node_id="a", device_id="gpu:0", servable=moe, memory_total_mb=24_000,
                      host_available_mb=40_000)
    d = choose(["moe"], [node])
    assert d.outcome is Outcome.ALL_BUSY
    (v,) = d.verdicts
    assert v.reason is Reason.HOST_MEMORY_SHORT
    assert "139408" in (v.note or "")
    paging = {"moe": ModelCost(6_400, 60.0, host_need_mb=139_408, allow_disk_paging=True)}
    d = choose(["moe"], [DeviceView(node_id="a", device_id="gpu:0", servable=paging,
                                    memory_total_mb=24_000, host_available_mb=40_000)])
    assert d.action is Action.LOAD_ON_EMPTY
    assert d.winner is not None
    assert "disk" in (d.winner.note or "")


def test_a_loaded_copy_is_served_though_its_host_ram_part_would_not_fit_again():
    # Its host part is already in RAM: what the node has left is after it loaded. Judged in
    # full (a split copy elsewhere makes the fast path step aside) it must still be served,
    # not left for the busy split copy.
    moe = ModelCost(6_400, 60.0, host_need_mb=30_000)
    loaded = DeviceView(node_id="a", device_id="gpu:0", servable={"moe": moe},
                        memory_total_mb=24_000, host_available_mb=8_000,
                        residents=(ResidentView("moe", charged_mb=6_400),))
    split = replace(moe, devices=("gpu:0", "gpu:1"))
    busy_split = ResidentView("moe", busy=2, charged_mb=3_200, devices=("gpu:0", "gpu:1"))
    other = [DeviceView(node_id="b", device_id=g, servable={"moe": split},
                        memory_total_mb=24_000, host_available_mb=8_000,
                        residents=(busy_split,), in_flight=2, pending_limit=2)
             for g in ("gpu:0", "gpu:1")]
    d = choose(["moe"], [loaded, *other])
    assert d.action is Action.USE_LOADED
    assert d.winner is not None
    assert (d.winner.node_id, d.winner.device_id) == ("a", "gpu:0")
    assert {v.node_id: v.reason for v in d.verdicts}["b"] is Reason.AT_PENDING_LIMIT
