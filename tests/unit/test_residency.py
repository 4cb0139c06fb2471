"""`make_room()`: what must leave a device for one more model, as tables and invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rolemesh.residency import NoRoom, Resident, Room, RoomPlan, Target, make_room, split_need

GPU = {"gpu:0": Room(24_000, 0.9)}  # 21,600 MB usable


def res(key: str, mb: int, *, device: str = "gpu:0", **kw: object) -> Resident:
    return Resident(key, key, {device: mb}, **kw)  # type: ignore[arg-type]


def room_for(need: int, residents: list[Resident], rooms: dict[str, Room] | None = None,
             **kw: object) -> RoomPlan | NoRoom:
    return make_room(Target("new", {"gpu:0": need}), rooms or GPU, residents,
                     **kw)  # type: ignore[arg-type]


def test_a_model_that_fits_beside_the_residents_starts_at_once():
    plan = room_for(8_000, [res("a", 6_000), res("b", 6_000, busy=True)])
    assert isinstance(plan, RoomPlan)
    assert plan.immediate
    assert plan.evict == ()


def test_the_cheapest_idle_resident_goes_not_the_biggest():
    plan = room_for(12_000, [res("a", 8_000, cost=50.0), res("b", 8_000, cost=5.0)])
    assert isinstance(plan, RoomPlan)
    assert plan.evict == ("b",)
    assert plan.cost == 5.0
    assert not plan.waits_for_busy


def test_the_cheapest_set_can_be_two_cheap_models_instead_of_one_dear_one():
    residents = [res("dear", 12_000, cost=100.0), res("c1", 5_000, cost=1.0),
                 res("c2", 4_000, cost=1.0)]
    plan = room_for(9_000, residents)
    assert isinstance(plan, RoomPlan)
    assert plan.evict == ("c1", "c2")


def test_an_idle_set_is_preferred_to_a_cheaper_busy_one():
    plan = room_for(11_000, [res("busy", 10_000, busy=True, cost=0.0),
                             res("idle", 10_000, cost=99.0)])
    assert isinstance(plan, RoomPlan)
    assert plan.evict == ("idle",)
    assert not plan.waits_for_busy


def test_when_only_busy_residents_can_make_room_the_plan_says_it_must_wait():
    plan = room_for(12_000, [res("busy", 12_000, busy=True)])
    assert isinstance(plan, RoomPlan)
    assert plan.evict == ("busy",)
    assert plan.waits_for_busy


def test_pinned_residents_are_never_evicted():
    result = room_for(12_000, [res("pin", 12_000, pinned=True)])
    assert (isinstance(result, NoRoom) and "pinned" in result.why) or "only" in result.why


def test_a_model_bigger_than_the_device_gets_no_room_with_the_sizes_in_the_reason():
    result = room_for(30_000, [])
    assert isinstance(result, NoRoom)
    assert "21600 MB usable" in result.why


def test_an_exclusive_target_evicts_everything_on_its_device():
    plan = make_room(Target("big", {"gpu:0": 2_000}, exclusive=True), GPU,
                     [res("a", 1_000), res("b", 1_000)])
    assert isinstance(plan, RoomPlan)
    assert plan.evict == ("a", "b")


def test_an_exclusive_resident_leaves_for_anything_else():
    plan = room_for(1_000, [res("alone", 1_000, exclusive=True)])
    assert isinstance(plan, RoomPlan)
    assert plan.evict == ("alone",)


def test_with_sets_a_device_holds_a_subset_of_one_set_and_the_cheapest_set_wins():
    sets = {"voice": frozenset({"chat", "think", "new"}), "solo": frozenset({"new", "x"})}
    residents = [Resident("chat", "chat", {"gpu:0": 1_000}, cost=10.0),
                 Resident("think", "think", {"gpu:0": 1_000}, cost=10.0)]
    plan = make_room(Target("new", {"gpu:0": 1_000}), GPU, residents, sets)
    assert isinstance(plan, RoomPlan)
    assert plan.immediate
    assert plan.set_name == "voice"
    # A model in no set runs alone.
    plan = make_room(Target("loner", {"gpu:0": 1_000}), GPU, residents, sets)
    assert isinstance(plan, RoomPlan)
    assert plan.evict == ("chat", "think")


def test_a_held_device_refuses_models_outside_its_set():
    result = make_room(Target("other", {"gpu:0": 1_000}), GPU, [], None,
                       {"gpu:0": frozenset({"architect"})})
    assert isinstance(result, NoRoom)
    assert "held" in result.why


def test_a_group_target_needs_room_on_every_device_of_the_group():
    rooms = {"gpu:0": Room(12_000, 1.0), "gpu:1": Room(12_000, 1.0)}
    need = split_need(20_000, ("gpu:0", "gpu:1"))
    assert need == {"gpu:0": 10_000, "gpu:1": 10_000}
    residents = [res("chat", 4_000, device="gpu:0"), res("think", 5_000, device="gpu:1")]
    plan = make_room(Target("big", need), rooms, residents)
    assert isinstance(plan, RoomPlan)
    assert plan.evict == ("chat", "think")


def test_a_tensor_split_leans_the_charge_on_the_device_with_more_weight():
    assert split_need(25_000, ("gpu:0", "gpu:1"), (1.0, 1.5)) == {"gpu:0": 10_000,
                                                                  "gpu:1": 15_000}


def test_room_still_held_by_a_resident_on_its_way_out_means_waiting_not_evicting():
    plan = room_for(12_000, [res("leaving", 12_000, leaving=True)])
    assert isinstance(plan, RoomPlan)
    assert plan.evict == ()
    assert plan.waits_for_leaving
    assert not plan.immediate


def test_the_backend_reporting_less_free_memory_than_the_budget_limits_the_room():
    rooms = {"gpu:0": Room(24_000, 0.9, free_mb=5_000)}  # something else holds memory
    result = room_for(8_000, [], rooms)
    assert isinstance(result, NoRoom)
    plan = room_for(8_000, [res("a", 4_000)], rooms)  # a's memory comes back when it goes
    assert isinstance(plan, RoomPlan)
    assert plan.evict == ("a",)


def test_an_unknown_total_fits_anything():
    plan = room_for(10**9, [], {"gpu:0": Room(None)})
    assert isinstance(plan, RoomPlan)
    assert plan.immediate


# -- invariants over generated devices -------------------------------------------------------

residents_st = st.lists(
    st.builds(lambda i, mb, busy, pinned, cost: Resident(
        f"m{i}", f"m{i}", {"gpu:0": mb}, busy=busy, pinned=pinned, cost=cost),
        st.integers(0, 40), st.integers(500, 12_000), st.booleans(), st.booleans(),
        st.floats(0, 100)),
    max_size=12, unique_by=lambda r: r.key)


@settings(max_examples=400, deadline=None)
@given(residents_st, st.integers(500, 24_000), st.integers(8_000, 48_000))
def test_a_plan_never_evicts_pinned_never_busy_when_idle_would_do_and_always_fits(
        residents, need, total):
    rooms = {"gpu:0": Room(total, 0.9)}
    plan = make_room(Target("new", {"gpu:0": need}), rooms, residents)
    usable = total * 0.9
    if isinstance(plan, NoRoom):
        # Then not even evicting every unpinned resident would have made room.
        kept = sum(r.charged_mb["gpu:0"] for r in residents if r.pinned)
        assert need + kept > usable
        return
    evicted = {r.key: r for r in residents if r.key in plan.evict}
    assert not any(r.pinned for r in evicted.values())
    kept = sum(r.charged_mb["gpu:0"] for r in residents if r.key not in plan.evict)
    assert kept + need <= usable
    assert plan.waits_for_busy == any(r.busy for r in evicted.values())
    if plan.waits_for_busy:
        # Evicting every idle unpinned resident would not have been enough.
        idle_kept = sum(r.charged_mb["gpu:0"] for r in residents if r.busy or r.pinned)
        assert idle_kept + need > usable
    # Minimal: putting any one evicted resident back would overflow.
    for r in evicted.values():
        assert kept + r.charged_mb["gpu:0"] + need > usable or len(residents) > 10


@settings(max_examples=200, deadline=None)
@given(residents_st, st.integers(500, 24_000))
def test_the_same_inputs_in_any_order_give_the_same_plan(residents, need):
    a = make_room(Target("new", {"gpu:0": need}), GPU, residents)
    b = make_room(Target("new", {"gpu:0": need}), GPU, list(reversed(residents)))
    assert a == b


@pytest.mark.parametrize("n", [4, 12, 16])
def test_many_residents_still_get_a_cover(n):
    residents = [res(f"m{i}", 2_000, cost=float(i)) for i in range(n)]
    rooms = {"gpu:0": Room(2_000 * n, 1.0)}
    plan = make_room(Target("new", {"gpu:0": 5_000}), rooms, residents)
    assert isinstance(plan, RoomPlan)
    assert len(plan.evict) == 3
    assert set(plan.evict) == {"m0", "m1", "m2"}
