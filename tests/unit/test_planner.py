"""`plan()`: a node's residency policy, as tables of situations and invariants over many."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from rolemesh.api import InstanceState as S
from rolemesh.api import StopReason
from rolemesh.planner import (
    Drain,
    Grant,
    InstanceView,
    ModelSpec,
    PlanView,
    Reject,
    Start,
    Stop,
    Undrain,
    WaiterView,
    WakeAt,
    WantView,
    instance_key,
    plan,
)
from rolemesh.residency import Room

G0 = ("gpu:0",)
G1 = ("gpu:1",)
BOTH = ("gpu:0", "gpu:1")
MODELS = {
    "chat": ModelSpec("chat", 5_000, load_s=2.0, demand=10),
    "think": ModelSpec("think", 6_000, load_s=4.0, demand=3),
    "coder": ModelSpec("coder", 18_000, load_s=10.0),
}
EMBED = ModelSpec("embed", 1_000, load_s=1.0, pinned=True)


def inst(model: str, devices: tuple[str, ...] = G0, state: S = S.READY, *, in_flight: int = 0,
         idle_since: float | None = 0.0, **kw: object) -> InstanceView:
    spec = MODELS.get(model, EMBED)
    return InstanceView(instance_key(model, devices), model, devices, state,
                        spec.need_on(devices), in_flight=in_flight, parallel=spec.parallel,
                        pinned=spec.pinned, exclusive=spec.exclusive, idle_since=idle_since,
                        **kw)  # type: ignore[arg-type]


def wait(i: int, model: str, devices: tuple[str, ...] = G0, at: float = 0.0) -> WaiterView:
    return WaiterView(i, model, devices, at)


def view(*, instances: Sequence[InstanceView] = (), waiters: Sequence[WaiterView] = (),
         gpus: Sequence[int] = (12_000,), models: dict[str, ModelSpec] | None = None,
         **kw: object) -> PlanView:
    rooms = {f"gpu:{i}": Room(mb, 0.9) for i, mb in enumerate(gpus)}
    return PlanView(rooms=rooms, device_order=tuple(rooms), models=models or MODELS,
                    instances=tuple(instances), waiters=tuple(waiters),
                    **kw)  # type: ignore[arg-type]


def kinds(actions: list[object]) -> list[object]:
    return [a for a in actions if not isinstance(a, WakeAt)]


def test_a_request_for_a_resident_model_is_granted_and_loads_nothing():
    assert plan(view(instances=[inst("chat")], waiters=[wait(1, "chat")]), 1.0) == [
        Grant(1, "chat@gpu:0")]


def test_a_model_that_fits_beside_the_resident_one_starts_without_evicting_it():
    actions = plan(view(instances=[inst("chat")], waiters=[wait(1, "think")], gpus=[16_000]),
                   1.0)
    assert actions == [Start("think", G0, "request")]


def test_a_model_that_does_not_fit_evicts_the_idle_resident_first():
    actions = plan(view(instances=[inst("chat")], waiters=[wait(1, "coder")], gpus=[24_000]),
                   1.0)
    assert actions == [Stop("chat@gpu:0", StopReason.EVICTED_FOR, "coder")]


def test_a_busy_resident_is_never_evicted_before_the_patience_bound():
    v = view(instances=[inst("chat", in_flight=1, ready_at=0.0)],
             waiters=[wait(1, "coder", at=0.0)], gpus=[24_000], patience_s=30.0)
    assert plan(v, 5.0) == [WakeAt(30.0)]


def test_past_the_patience_bound_the_busy_resident_drains_then_stops_when_idle():
    v = view(instances=[inst("chat", in_flight=1)], waiters=[wait(1, "coder", at=0.0)],
             gpus=[24_000], patience_s=30.0)
    assert plan(v, 31.0) == [Drain("chat@gpu:0", "evicted_for:coder")]
    drained = view(instances=[inst("chat", G0, S.DRAINING, draining_for="evicted_for:coder")],
                   waiters=[wait(1, "coder", at=0.0)], gpus=[24_000])
    assert plan(drained, 32.0) == [Stop("chat@gpu:0", StopReason.EVICTED_FOR, "coder")]


def test_patience_is_never_shorter_than_the_round_trip_of_the_switch():
    # Load coder (100 s), then chat back (2 s, it still has demand): 102 s, not coder's 100.
    models = {**MODELS, "coder": ModelSpec("coder", 18_000, load_s=100.0)}
    v = view(instances=[inst("chat", in_flight=1)], waiters=[wait(1, "coder", at=0.0)],
             gpus=[24_000], patience_s=30.0, models=models)
    assert plan(v, 50.0) == [WakeAt(102.0)]
    # A model nobody asked for lately costs no reload: the bound is coder's load alone.
    idle_chat = {**models, "chat": ModelSpec("chat", 5_000, load_s=2.0, demand=0)}
    v = view(instances=[inst("chat", in_flight=1)], waiters=[wait(1, "coder", at=0.0)],
             gpus=[24_000], patience_s=30.0, models=idle_chat)
    assert plan(v, 50.0) == [WakeAt(100.0)]


def test_a_drain_nobody_needs_any_more_is_undone_and_its_waiters_served():
    v = view(instances=[inst("chat", G0, S.DRAINING, draining_for="evicted_for:coder")],
             waiters=[wait(1, "chat")], gpus=[24_000])
    assert plan(v, 1.0) == [Undrain("chat@gpu:0"), Grant(1, "chat@gpu:0")]


def test_a_pinned_model_is_started_and_never_evicted():
    models = {**MODELS, "embed": EMBED}
    assert plan(view(models=models), 0.0) == [Start("embed", G0, "pinned")]
    pinned = inst("embed")
    v = view(instances=[pinned, inst("chat")], waiters=[wait(1, "coder")], gpus=[24_000],
             models=models)
    actions = plan(v, 1.0)
    assert Stop("chat@gpu:0", StopReason.EVICTED_FOR, "coder") in actions
    assert not any(isinstance(a, Stop) and a.instance == "embed@gpu:0" for a in actions)


def test_when_only_pinned_memory_could_make_room_the_request_is_refused_with_why():
    models = {**MODELS, "coder": ModelSpec("coder", 10_000), "embed":
              ModelSpec("embed", 5_000, pinned=True)}
    v = view(instances=[inst("embed")], waiters=[wait(1, "coder")], models=models)
    (action,) = kinds(plan(v, 1.0))
    assert isinstance(action, Reject)
    assert "pinned" in action.message


def test_an_idle_instance_past_its_ttl_stops_and_before_that_a_wake_up_is_armed():
    models = {"chat": ModelSpec("chat", 5_000, ttl_s=60.0)}
    v = view(instances=[inst("chat", ttl_s=60.0, idle_since=100.0)], models=models)
    assert plan(v, 130.0) == [WakeAt(160.0)]
    assert plan(v, 160.0) == [Stop("chat@gpu:0", StopReason.TTL)]


def test_a_busy_instance_never_stops_for_its_ttl():
    models = {"chat": ModelSpec("chat", 5_000, ttl_s=1.0)}
    v = view(instances=[inst("chat", ttl_s=1.0, in_flight=1, idle_since=None)], models=models)
    assert plan(v, 1_000.0) == []


def test_a_model_that_failed_to_load_is_refused_until_its_backoff_ends():
    v = view(waiters=[wait(1, "chat")], failed_until={"chat@gpu:0": 10.0},
             models={"chat": MODELS["chat"]})
    (action,) = plan(v, 5.0)
    assert isinstance(action, Reject)
    assert "next try in 5.0s" in action.message
    assert plan(v, 10.0) == [Start("chat", G0, "request")]


def test_an_exclusive_model_over_two_gpus_evicts_both_and_a_later_small_one_evicts_it():
    models = {"chat": ModelSpec("chat", 4_000), "think": ModelSpec("think", 6_000),
              "big": ModelSpec("big", 20_000, devices=BOTH, exclusive=True)}
    v = view(instances=[inst("chat"), inst("think", G1)], waiters=[wait(1, "big", BOTH)],
             gpus=[12_000, 12_000], models=models)
    assert plan(v, 1.0) == [Stop("chat@gpu:0", StopReason.EVICTED_FOR, "big"),
                            Stop("think@gpu:1", StopReason.EVICTED_FOR, "big")]
    big = InstanceView("big@gpu:0+gpu:1", "big", BOTH, S.READY,
                       {"gpu:0": 10_000, "gpu:1": 10_000}, exclusive=True, idle_since=0.0)
    v = view(instances=[big], waiters=[wait(2, "chat")], gpus=[12_000, 12_000], models=models)
    assert plan(v, 2.0) == [Stop("big@gpu:0+gpu:1", StopReason.EVICTED_FOR, "chat")]


def test_with_sets_declared_a_device_only_holds_a_subset_of_one_set():
    models = {m: ModelSpec(m, 1_000) for m in ("architect", "builder", "chat")}
    sets = {"arch": frozenset({"architect", "chat"}), "build": frozenset({"builder", "chat"})}
    v = view(instances=[inst_of("architect"), inst_of("chat")], waiters=[wait(1, "builder")],
             models=models, sets=sets)
    assert plan(v, 1.0) == [Stop("architect@gpu:0", StopReason.EVICTED_FOR, "builder")]


def inst_of(model: str, devices: tuple[str, ...] = G0) -> InstanceView:
    return InstanceView(instance_key(model, devices), model, devices, S.READY,
                        {devices[0]: 1_000}, idle_since=0.0)


def test_a_device_held_for_a_set_stops_others_and_refuses_their_requests():
    models = {m: ModelSpec(m, 1_000) for m in ("architect", "builder")}
    held = {"gpu:0": frozenset({"architect"})}
    v = view(instances=[inst_of("builder")], waiters=[wait(1, "builder")], models=models,
             held=held)
    actions = plan(v, 1.0)
    assert Stop("builder@gpu:0", StopReason.MODE) in actions
    assert any(isinstance(a, Reject) and a.waiter == 1 for a in actions)


def test_an_unload_waits_for_in_flight_requests_then_stops_by_its_deadline():
    unloading = inst("chat", in_flight=1, stop=StopReason.UNLOAD, stop_by=10.0)
    assert plan(view(instances=[unloading], models={"chat": MODELS["chat"]}), 1.0) == [
        Drain("chat@gpu:0", "unload"), WakeAt(10.0)]
    assert plan(view(instances=[unloading], models={"chat": MODELS["chat"]}), 10.0) == [
        Stop("chat@gpu:0", StopReason.UNLOAD)]


def test_a_draining_node_refuses_requests_and_stops_idle_instances():
    v = view(instances=[inst("chat"), inst("think", G0, in_flight=1)],
             waiters=[wait(1, "chat")], draining=True, models={"chat": MODELS["chat"],
                                                              "think": MODELS["think"]})
    actions = plan(v, 1.0)
    assert actions[0] == Reject(1, "this node is draining")
    assert Stop("chat@gpu:0", StopReason.DRAIN) in actions
    assert Drain("think@gpu:0", "drain") in actions


def test_a_pinned_model_on_a_worse_device_moves_back_when_the_better_one_has_room():
    models = {"embed": ModelSpec("embed", 1_000, pinned=True)}
    rooms = {"gpu:0": Room(8_000), "cpu": Room(64_000)}
    on_cpu = InstanceView("embed@cpu", "embed", ("cpu",), S.READY, {"cpu": 1_000},
                          pinned=True, idle_since=0.0)
    v = PlanView(rooms=rooms, device_order=("gpu:0", "cpu"), models=models,
                 instances=(on_cpu,))
    assert plan(v, 1.0) == [Start("embed", G0, "moved")]
    on_gpu = InstanceView("embed@gpu:0", "embed", G0, S.READY, {"gpu:0": 1_000}, pinned=True)
    v = PlanView(rooms=rooms, device_order=("gpu:0", "cpu"), models=models,
                 instances=(on_cpu, on_gpu))
    assert plan(v, 2.0) == [Stop("embed@cpu", StopReason.MOVED, "gpu:0")]


def test_an_operator_load_without_a_device_goes_where_it_fits_best():
    v = view(instances=[inst("chat")], wants=[WantView(7, "coder", None)],
             gpus=[12_000, 24_000], models={"chat": MODELS["chat"], "coder": MODELS["coder"]})
    assert plan(v, 1.0) == [Start("coder", G1, "load", 7)]


def test_co_residency_off_makes_every_load_a_switch():
    v = view(instances=[inst("chat")], waiters=[wait(1, "think")], co_residency=False,
             models={"chat": MODELS["chat"], "think": MODELS["think"]})
    assert plan(v, 1.0) == [Stop("chat@gpu:0", StopReason.EVICTED_FOR, "think")]


# -- invariants over generated node states ---------------------------------------------------

NAMES = ("a", "b", "c", "d", "e")


@st.composite
def node_states(draw: st.DrawFn) -> tuple[PlanView, float]:
    n_gpus = draw(st.integers(1, 2))
    gpus = [draw(st.sampled_from([8_000, 12_000, 24_000])) for _ in range(n_gpus)]
    rooms = {f"gpu:{i}": Room(mb, 0.9) for i, mb in enumerate(gpus)}
    models = {m: ModelSpec(m, draw(st.integers(500, 14_000)), load_s=draw(st.floats(0.5, 20)),
                           pinned=draw(st.booleans()) and m == "a",
                           exclusive=draw(st.booleans()) and m == "e",
                           ttl_s=draw(st.none() | st.floats(1, 100)),
                           demand=draw(st.integers(0, 20))) for m in NAMES}
    instances: list[InstanceView] = []
    for d, room in rooms.items():
        used = 0.0
        for m in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3)):
            need = models[m].need_mb
            if used + need > room.total_mb * 0.9:  # type: ignore[operator]
                continue
            used += need
            state = draw(st.sampled_from([S.READY, S.READY, S.STARTING, S.DRAINING]))
            instances.append(InstanceView(
                instance_key(m, (d,)), m, (d,), state, {d: need},
                in_flight=draw(st.integers(0, 2)) if state is not S.STARTING else 0,
                pinned=models[m].pinned, exclusive=models[m].exclusive,
                ttl_s=models[m].ttl_s, idle_since=draw(st.none() | st.floats(0, 50)),
                draining_for="evicted_for:x" if state is S.DRAINING else None))
    waiters = [WaiterView(i, draw(st.sampled_from(NAMES)), (draw(st.sampled_from(list(rooms))),),
                          draw(st.floats(0, 60))) for i in range(draw(st.integers(0, 6)))]
    v = PlanView(rooms=rooms, device_order=tuple(rooms), models=models,
                 instances=tuple(instances), waiters=tuple(waiters),
                 co_residency=draw(st.booleans()), patience_s=draw(st.floats(0, 40)))
    return v, draw(st.floats(0, 120))


@settings(max_examples=500, deadline=None)
@given(node_states())
def test_plan_never_evicts_pinned_or_busy_never_overfills_and_is_deterministic(state):
    v, now = state
    actions = plan(v, now)
    assert actions == plan(v, now)  # same inputs, same actions
    by_key = {i.key: i for i in v.instances}
    granted = {a.waiter for a in actions if isinstance(a, Grant)}
    assert len(granted) == sum(1 for a in actions if isinstance(a, Grant))  # once each
    for a in actions:
        if isinstance(a, Stop):
            i = by_key[a.instance]
            assert not i.pinned or a.reason is StopReason.MOVED, "a pinned instance was stopped"
            assert i.in_flight == 0, "an instance with requests in flight was stopped"
        if isinstance(a, Grant):
            i = by_key[a.instance]
            assert i.state is S.READY or a.instance in {
                u.instance for u in actions if isinstance(u, Undrain)}
    # Starts never overfill a device: what stays plus what starts fits the budget.
    stopped = {a.instance for a in actions if isinstance(a, Stop | Drain)}
    for d, room in v.rooms.items():
        starts = [a for a in actions if isinstance(a, Start) and d in a.devices]
        if not starts:
            continue
        kept = sum(i.charged_mb.get(d, 0) for i in v.instances if i.key not in stopped)
        new = sum(v.models[a.model_id].need_on(a.devices)[d] for a in starts)
        assert kept + new <= room.total_mb * room.margin  # type: ignore[operator]
        if any(v.models[a.model_id].exclusive or not v.co_residency for a in starts):
            assert len(starts) == 1
            assert all(
                i.key in stopped or d not in i.devices for i in v.instances)
