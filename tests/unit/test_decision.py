"""`choose()`: which device serves a request, as tables of clusters and the expected choice.

Every case is plain data: a list of devices, the models a request names, and what should
win (or why nothing does). The last section throws a few thousand random clusters at it and
checks the rules that must always hold.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from rolemesh.api import SlotState
from rolemesh.decision import (
    Action,
    Decision,
    DeviceView,
    ModelCost,
    Outcome,
    Policy,
    Reason,
    Verdict,
    choose,
    eviction_cost,
    fits_device,
)

# Three models a node can serve: memory need (MB) and load time (s).
MODELS: dict[str, ModelCost] = {
    "small": ModelCost(memory_need_mb=4_000, load_s=5.0),
    "mid": ModelCost(memory_need_mb=10_000, load_s=20.0),
    "large": ModelCost(memory_need_mb=20_000, load_s=40.0),
}
UNSET = object()


def dev(device_id: str = "gpu:0", *, node: str = "a", total: int | None = 24_000,
        free: int | object | None = UNSET, loaded: str | None = None,
        state: SlotState | None = None, in_flight: int = 0, pending: int = 0,
        limit: int = 2, up: bool = True, recent: Mapping[str, int] | None = None,
        serves: Sequence[str] = tuple(MODELS)) -> DeviceView:
    """A device; by default its free memory is its total less what the loaded model holds."""
    if state is None:
        state = SlotState.READY if loaded else SlotState.EMPTY
    if free is UNSET:
        held = MODELS[loaded].memory_need_mb if loaded else 0
        free = None if total is None else total - held
    assert free is None or isinstance(free, int)
    return DeviceView(node_id=node, device_id=device_id,
                      servable={m: MODELS[m] for m in serves}, memory_total_mb=total,
                      memory_free_mb=free, loaded_model=loaded, slot_state=state,
                      in_flight=in_flight, pending=pending, pending_limit=limit, up=up,
                      recent_requests=dict(recent or {}))


def where(decision: Decision) -> tuple[str, str, str, Action] | None:
    w = decision.winner
    if w is None or decision.action is None:
        return None
    return (w.node_id, w.device_id, w.model_id, decision.action)


def verdict_of(decision: Decision, device_id: str, model_id: str, node: str = "a") -> Verdict:
    (found,) = [v for v in decision.verdicts
                if (v.node_id, v.device_id, v.model_id) == (node, device_id, model_id)]
    return found


@dataclass(frozen=True)
class Win:
    models: tuple[str, ...]
    devices: tuple[DeviceView, ...]
    expected: tuple[str, str, str, Action]  # node, device, model, action
    policy: Policy


def win(models: str | tuple[str, ...], devices: Sequence[DeviceView], winner: str,
        action: Action, policy: Policy | None = None) -> Win:
    """`winner` reads "node/device model", e.g. "a/gpu:1 small"."""
    names = (models,) if isinstance(models, str) else models
    place, model = winner.split()
    node, device = place.split("/")
    return Win(names, tuple(devices), (node, device, model, action), policy or Policy())


USE, LOAD, EVICT, SWITCH = (Action.USE_LOADED, Action.LOAD_ON_EMPTY, Action.EVICT,
                            Action.SWITCH_AFTER_QUEUE)

WINS: dict[str, Win] = {
    "a healthy empty device goes before a failed one with more free memory": win(
        "small", [dev("gpu:0", state=SlotState.FAILED, total=48_000), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    "a failed empty device is still used when no healthy empty device fits": win(
        "small", [dev("gpu:0", state=SlotState.FAILED), dev("gpu:1", loaded="mid")],
        "a/gpu:0 small", LOAD),
    # -- rule 3: the model is already loaded ------------------------------------------------
    "a device with the model loaded wins over an empty device": win(
        "small", [dev("gpu:0"), dev("gpu:1", loaded="small")], "a/gpu:1 small", USE),
    "a device with the model loaded wins over evicting an idle model": win(
        "small", [dev("gpu:0", loaded="mid"), dev("gpu:1", loaded="small")],
        "a/gpu:1 small", USE),
    "a loaded device with a queue still wins over an empty device": win(
        "small", [dev("gpu:0"), dev("gpu:1", loaded="small", in_flight=1, pending=2, limit=4)],
        "a/gpu:1 small", USE),
    "the loaded device with the least queue wins": win(
        "small", [dev("gpu:0", loaded="small", pending=2, limit=4),
                  dev("gpu:1", loaded="small", in_flight=1, pending=1, limit=4),
                  dev("gpu:2", loaded="small", in_flight=1, limit=4)],
        "a/gpu:2 small", USE),
    "queue counts in-flight and pending together": win(
        "small", [dev("gpu:0", loaded="small", in_flight=2, limit=4),
                  dev("gpu:1", loaded="small", pending=1, limit=4)],
        "a/gpu:1 small", USE),
    "between loaded devices with equal queues the one with more free memory wins": win(
        "small", [dev("gpu:0", loaded="small", free=2_000), dev("gpu:1", loaded="small")],
        "a/gpu:1 small", USE),
    "between identical loaded devices the lowest node and device id wins": win(
        "small", [dev("gpu:1", node="b", loaded="small"), dev("gpu:1", loaded="small"),
                  dev("gpu:0", node="b", loaded="small")], "a/gpu:1 small", USE),
    "a starting slot with the model counts as loaded": win(
        "small", [dev("gpu:0"), dev("gpu:1", loaded="small", state=SlotState.STARTING,
                                    pending=1, limit=4)], "a/gpu:1 small", USE),
    "a draining slot with the model does not count as loaded": win(
        "small", [dev("gpu:0", loaded="small", state=SlotState.DRAINING), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    "a failed slot with the model does not count as loaded": win(
        "small", [dev("gpu:0", loaded="small", state=SlotState.FAILED), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    "a loaded device at its pending limit is passed over for an empty one": win(
        "small", [dev("gpu:0", loaded="small", in_flight=1, pending=1), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    "a loaded device on a down node is passed over for an empty one": win(
        "small", [dev("gpu:0", loaded="small", up=False), dev("gpu:0", node="b")],
        "b/gpu:0 small", LOAD),
    # -- rule 4: an empty device -----------------------------------------------------------
    "the empty device with the most free memory wins": win(
        "small", [dev("gpu:0", free=10_000), dev("gpu:1", free=20_000), dev("gpu:2", free=8_000)],
        "a/gpu:1 small", LOAD),
    "more free memory beats a shorter queue on empty devices": win(
        "small", [dev("gpu:0", free=10_000), dev("gpu:1", free=20_000, pending=1, limit=4)],
        "a/gpu:1 small", LOAD),
    "between empty devices with equal free memory the least queue wins": win(
        "small", [dev("gpu:0", pending=1, limit=4), dev("gpu:1")], "a/gpu:1 small", LOAD),
    "an empty device with known free memory wins over one with unknown free memory": win(
        "small", [dev("gpu:0", free=None), dev("gpu:1", free=5_000)], "a/gpu:1 small", LOAD),
    "an empty device of unknown size is used when it is the only one": win(
        "large", [dev("cpu", total=None, free=None)], "a/cpu large", LOAD),
    "an empty device wins over evicting an idle model": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 0}), dev("gpu:1", free=5_000)],
        "a/gpu:1 small", LOAD),
    "an empty device without enough free memory loses to an eviction": win(
        "mid", [dev("gpu:0", free=3_000), dev("gpu:1", loaded="small")],
        "a/gpu:1 mid", EVICT),
    "a device too small for the model is passed over for a larger one": win(
        "mid", [dev("gpu:0", total=8_000), dev("gpu:1", total=12_000)],
        "a/gpu:1 mid", LOAD),
    "a device at its pending limit is passed over even when empty": win(
        "small", [dev("gpu:0", pending=2), dev("gpu:1", free=5_000)], "a/gpu:1 small", LOAD),
    "a down node's empty device is passed over": win(
        "small", [dev("gpu:0", up=False), dev("gpu:0", node="b", free=5_000)],
        "b/gpu:0 small", LOAD),
    "a device that fits only under a looser safety margin wins with that margin": win(
        "mid", [dev("gpu:0", total=10_500), dev("gpu:1", total=24_000, loaded="small")],
        "a/gpu:0 mid", LOAD, Policy(memory_safety_margin=0.96)),
    "a device that does not fit under the default margin is passed over": win(
        "mid", [dev("gpu:0", total=10_500), dev("gpu:1", total=24_000, loaded="small")],
        "a/gpu:1 mid", EVICT),
    # -- rule 5: evict an idle model -------------------------------------------------------
    "eviction picks the model with the fewest recent requests times load time": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 10}),      # 10 x 20 s = 200
                  dev("gpu:1", loaded="large", recent={"large": 3})],  # 3 x 40 s = 120
        "a/gpu:1 small", EVICT),
    "eviction weighs load time, not only request counts": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 5}),       # 5 x 20 s = 100
                  dev("gpu:1", loaded="large", recent={"large": 3})],  # 3 x 40 s = 120
        "a/gpu:0 small", EVICT),
    "a model with no recent requests is the cheapest to evict": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 1}), dev("gpu:1", loaded="large")],
        "a/gpu:1 small", EVICT),
    "a model loaded on two devices costs nothing to lose": win(
        "small", [dev("gpu:0", loaded="large", recent={"large": 1}),
                  dev("gpu:1", loaded="mid", recent={"mid": 100}),
                  dev("gpu:2", loaded="mid", recent={"mid": 100}, in_flight=1, limit=4)],
        "a/gpu:1 small", EVICT),
    "a copy on a down node does not make a model free to lose": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 100}),
                  dev("gpu:1", loaded="large", recent={"large": 1}),
                  dev("gpu:0", node="b", loaded="mid", up=False)],
        "a/gpu:1 small", EVICT),
    "a draining copy does not make a model free to lose": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 100}),
                  dev("gpu:1", loaded="large", recent={"large": 1}),
                  dev("gpu:2", loaded="mid", state=SlotState.DRAINING, free=0)],
        "a/gpu:1 small", EVICT),
    "between equally cheap evictions the larger device wins": win(
        "small", [dev("gpu:0", loaded="mid", total=16_000), dev("gpu:1", loaded="mid")],
        "a/gpu:1 small", EVICT),
    "between identical evictions the lowest device id wins": win(
        "small", [dev("gpu:1", loaded="mid"), dev("gpu:0", loaded="large")],
        "a/gpu:0 small", EVICT),
    "a busy model is never evicted while an idle one can be, however costly": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, limit=4),
                  dev("gpu:1", loaded="large", recent={"large": 1_000})],
        "a/gpu:1 small", EVICT),
    "a starting model with no queue is idle and can be evicted": win(
        "small", [dev("gpu:0", loaded="mid", state=SlotState.STARTING)],
        "a/gpu:0 small", EVICT),
    # -- rule 6: queue behind a busy device and switch after -----------------------------
    "with every device busy the request queues on the one with the least queue": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, pending=1, limit=4),
                  dev("gpu:1", loaded="large", in_flight=1, limit=4)],
        "a/gpu:1 small", SWITCH),
    "with equal queues the switch goes where the loaded model is cheaper to lose": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, limit=4, recent={"mid": 10}),
                  dev("gpu:1", loaded="large", in_flight=1, limit=4, recent={"large": 1})],
        "a/gpu:1 small", SWITCH),
    "a switch is only chosen when no empty device or idle model is left": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, limit=4),
                  dev("gpu:1", loaded="large", in_flight=1, limit=4),
                  dev("gpu:2", free=5_000)],
        "a/gpu:2 small", LOAD),
    "a busy device at its pending limit gets no switch": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, pending=1),
                  dev("gpu:1", loaded="large", in_flight=1, pending=2, limit=4)],
        "a/gpu:1 small", SWITCH),
    # -- roles: several candidate models --------------------------------------------------
    "a role uses whichever of its models is already loaded": win(
        ("small", "mid"), [dev("gpu:0", loaded="mid"), dev("gpu:1")],
        "a/gpu:0 mid", USE),
    "a role's loaded model wins even when another of its models could load on an empty device":
        win(("mid", "small"), [dev("gpu:0"), dev("gpu:1", loaded="small", in_flight=1, limit=4)],
            "a/gpu:1 small", USE),
    "a role's loaded models compete on queue length": win(
        ("small", "mid"), [dev("gpu:0", loaded="small", in_flight=1, limit=4),
                           dev("gpu:1", loaded="mid")], "a/gpu:1 mid", USE),
    "a role loads the model that fits when its other model fits nowhere": win(
        ("large", "small"), [dev("gpu:0", total=12_000)], "a/gpu:0 small", LOAD),
    "a role's models tied on one empty device are broken by model id": win(
        ("small", "mid"), [dev("gpu:0")], "a/gpu:0 mid", LOAD),
    "a role spans nodes that serve different models of it": win(
        ("small", "mid"), [dev("gpu:0", serves=["small"], free=6_000),
                           dev("gpu:0", node="b", serves=["mid"], free=20_000)],
        "b/gpu:0 mid", LOAD),
    "a repeated model id counts once": win(
        ("small", "small"), [dev("gpu:0", loaded="small")], "a/gpu:0 small", USE),
}


@pytest.mark.parametrize("case", WINS.values(), ids=WINS.keys())
def test_winner(case: Win) -> None:
    decision = choose(case.models, case.devices, case.policy)
    assert decision.outcome == Outcome.ROUTED
    assert where(decision) == case.expected


@pytest.mark.parametrize("case", WINS.values(), ids=WINS.keys())
def test_input_order_does_not_change_the_winner(case: Win) -> None:
    orders = list(itertools.islice(itertools.permutations(case.devices), 120))
    for devices in orders:
        for models in (case.models, tuple(reversed(case.models))):
            assert where(choose(models, devices, case.policy)) == case.expected


@pytest.mark.parametrize("case", WINS.values(), ids=WINS.keys())
def test_exactly_the_winner_is_chosen_and_every_candidate_has_a_verdict(case: Win) -> None:
    decision = choose(case.models, case.devices, case.policy)
    chosen = [v for v in decision.verdicts if v.chosen]
    assert chosen == [decision.winner]
    expected_pairs = [(d.node_id, d.device_id, m) for d in case.devices
                      for m in dict.fromkeys(case.models) if m in d.servable]
    assert [(v.node_id, v.device_id, v.model_id) for v in decision.verdicts] == expected_pairs


# -- one device, one model: the reason it gets ------------------------------------------------

REASONS: dict[str, tuple[DeviceView, Reason] | tuple[DeviceView, Reason, Policy]] = {
    "a down node is node_down": (dev(up=False), Reason.NODE_DOWN),
    "a down node is node_down even when the model is loaded there":
        (dev(up=False, loaded="small"), Reason.NODE_DOWN),
    "a down node is node_down before anything about size":
        (dev(up=False, total=1_000), Reason.NODE_DOWN),
    "a model larger than total x margin does_not_fit": (dev(total=4_000), Reason.DOES_NOT_FIT),
    "does_not_fit is reported before the pending limit":
        (dev(total=4_000, pending=2), Reason.DOES_NOT_FIT),
    "a need under total x margin fits": (dev(total=4_445), Reason.FITS_EMPTY_DEVICE),
    "a need just over total x margin does_not_fit": (dev(total=4_444), Reason.DOES_NOT_FIT),
    "the safety margin comes from the policy":
        (dev(total=4_200), Reason.FITS_EMPTY_DEVICE, Policy(memory_safety_margin=0.96)),
    "a margin of 1.0 lets a model use the whole device":
        (dev(total=4_000), Reason.FITS_EMPTY_DEVICE, Policy(memory_safety_margin=1.0)),
    "an unknown total size is treated as fitting":
        (dev(total=None, free=None), Reason.FITS_EMPTY_DEVICE),
    "a queue equal to the pending limit is at_pending_limit":
        (dev(in_flight=1, pending=1), Reason.AT_PENDING_LIMIT),
    "a queue over the pending limit is at_pending_limit":
        (dev(in_flight=3, pending=2, limit=4), Reason.AT_PENDING_LIMIT),
    "the pending limit applies to a device with the model loaded":
        (dev(loaded="small", in_flight=2), Reason.AT_PENDING_LIMIT),
    "one below the pending limit is still a candidate":
        (dev(loaded="small", in_flight=1), Reason.MODEL_LOADED),
    "a ready slot with the model is model_loaded": (dev(loaded="small"), Reason.MODEL_LOADED),
    "a starting slot with the model is model_loaded":
        (dev(loaded="small", state=SlotState.STARTING), Reason.MODEL_LOADED),
    "a draining slot is mid-switch: usable only after it":
        (dev(loaded="small", state=SlotState.DRAINING), Reason.SWITCH_AFTER_QUEUE),
    "a draining slot is mid-switch whatever its free memory":
        (dev(loaded="small", state=SlotState.DRAINING, free=1_000), Reason.SWITCH_AFTER_QUEUE),
    "a stopping slot is mid-switch: usable only after it":
        (dev(loaded="small", state=SlotState.STOPPING, free=24_000),
         Reason.SWITCH_AFTER_QUEUE),
    "a failed slot with the model is treated as empty":
        (dev(loaded="small", state=SlotState.FAILED, free=24_000), Reason.FITS_EMPTY_DEVICE),
    "a ready slot claiming no model is treated as empty":
        (dev(state=SlotState.READY), Reason.FITS_EMPTY_DEVICE),
    "an empty device with enough free memory is fits_empty_device":
        (dev(), Reason.FITS_EMPTY_DEVICE),
    "free memory exactly equal to the need is enough":
        (dev(free=4_000), Reason.FITS_EMPTY_DEVICE),
    "free memory one MB short of the need is not_enough_free_memory":
        (dev(free=3_999), Reason.NOT_ENOUGH_FREE_MEMORY),
    "unknown free memory on an empty device is treated as fitting":
        (dev(free=None), Reason.FITS_EMPTY_DEVICE),
    "free memory is not checked when another model would be evicted":
        (dev(loaded="mid", free=0), Reason.EVICT_IDLE_MODEL),
    "another model loaded and idle is evict_idle_model":
        (dev(loaded="mid"), Reason.EVICT_IDLE_MODEL),
    "another model starting with no queue is evict_idle_model":
        (dev(loaded="mid", state=SlotState.STARTING), Reason.EVICT_IDLE_MODEL),
    "another model with a request in flight is switch_after_queue":
        (dev(loaded="mid", in_flight=1), Reason.SWITCH_AFTER_QUEUE),
    "another model with a request waiting is switch_after_queue":
        (dev(loaded="mid", pending=1), Reason.SWITCH_AFTER_QUEUE),
}


@pytest.mark.parametrize("case", REASONS.values(), ids=REASONS.keys())
def test_reason_for_one_device(case: tuple[DeviceView, Reason] | tuple[DeviceView, Reason, Policy],
                               ) -> None:
    device, reason, *rest = case
    decision = choose(["small"], [device], *rest)
    (verdict,) = decision.verdicts
    assert verdict.reason == reason
    assert verdict.chosen == (decision.outcome == Outcome.ROUTED)


def test_a_verdict_carries_the_numbers_it_was_judged_on() -> None:
    device = dev("gpu:3", node="n", loaded="mid", free=14_000, in_flight=1, pending=2, limit=5,
                 recent={"mid": 7})
    (v,) = choose(["small"], [device]).verdicts
    assert v == Verdict(node_id="n", device_id="gpu:3", model_id="small",
                        reason=Reason.SWITCH_AFTER_QUEUE, chosen=True, queue=3,
                        memory_need_mb=4_000, memory_total_mb=24_000, memory_free_mb=14_000,
                        eviction_cost=140.0, evicts="mid")


def test_an_eviction_verdict_names_the_model_it_evicts_and_its_cost() -> None:
    decision = choose(["small"], [dev("gpu:0", loaded="large", recent={"large": 2})])
    assert decision.action == Action.EVICT
    assert decision.winner is not None
    assert (decision.winner.evicts, decision.winner.eviction_cost) == ("large", 80.0)


def test_verdicts_that_evict_nothing_carry_no_eviction_figures() -> None:
    decision = choose(["small"], [dev("gpu:0"), dev("gpu:1", loaded="small"),
                                  dev("gpu:2", up=False)])
    assert {(v.evicts, v.eviction_cost) for v in decision.verdicts} == {(None, None)}


# -- eviction cost and fit, on their own --------------------------------------------------

@pytest.mark.parametrize(("device", "holders", "cost"), [
    (dev(loaded="mid", recent={"mid": 3}), {"mid": 1}, 60.0),
    (dev(loaded="mid", recent={"mid": 3}), {"mid": 2}, 0.0),
    (dev(loaded="mid"), {"mid": 1}, 0.0),
    (dev(), {}, 0.0),
    (dev(loaded="large", recent={"large": 1}, serves=["small"]), {"large": 1}, 1.0),
], ids=[
    "recent requests times load time",
    "nothing when another device holds the model too",
    "nothing when the model had no recent requests",
    "nothing when no model is loaded",
    "a load time of one second when the node does not list the model",
])
def test_eviction_cost(device: DeviceView, holders: dict[str, int], cost: float) -> None:
    assert eviction_cost(device, holders) == cost


@pytest.mark.parametrize(("need", "total", "margin", "fits"), [
    (9_000, 10_000, 0.9, True),
    (9_001, 10_000, 0.9, False),
    (10_000, 10_000, 1.0, True),
    (1_000_000, None, 0.9, True),
], ids=["need at total x margin fits", "one MB over does not fit", "margin one uses it all",
        "unknown size fits"])
def test_fits_device(need: int, total: int | None, margin: float, fits: bool) -> None:
    device = DeviceView("a", "gpu:0", servable={}, memory_total_mb=total)
    policy = Policy(memory_safety_margin=margin)
    assert fits_device(ModelCost(need), device, policy) is fits


# -- nothing routed: outcomes the client can act on ----------------------------------------

@dataclass(frozen=True)
class Nothing:
    models: tuple[str, ...]
    devices: tuple[DeviceView, ...]
    outcome: Outcome
    explain: str
    retry_after_s: float | None = None
    smallest_need_mb: int | None = None
    largest_device_mb: int | None = None


BUSY_POLICY = Policy(busy_retry_after_s=2.5)

NOTHINGS: dict[str, Nothing] = {
    "no devices at all is no_candidates": Nothing(
        ("small",), (), Outcome.NO_CANDIDATES, "no node serves small"),
    "devices that do not serve the model are no_candidates": Nothing(
        ("small", "mid"), (dev(serves=["large"]),), Outcome.NO_CANDIDATES,
        "no node serves small, mid"),
    "a model nobody knows is no_candidates": Nothing(
        ("ghost",), (dev(),), Outcome.NO_CANDIDATES, "no node serves ghost"),
    "every serving node down is all_down": Nothing(
        ("small",), (dev(up=False), dev("gpu:1", up=False, loaded="small")), Outcome.ALL_DOWN,
        "every node that serves small is down", retry_after_s=2.5),
    "a model that fits only on a down node is all_down, not fits_nowhere": Nothing(
        ("large",), (dev(up=False), dev("gpu:0", node="b", total=12_000)), Outcome.ALL_DOWN,
        "every device large enough for large is down", retry_after_s=2.5),
    "a down node of unknown size might hold the model, so it is all_down": Nothing(
        ("large",), (dev(up=False, total=None, free=None), dev("gpu:0", node="b", total=8_000)),
        Outcome.ALL_DOWN, "every device large enough for large is down", retry_after_s=2.5),
    "every node down and too small anyway is fits_nowhere, not all_down": Nothing(
        ("large",), (dev(up=False, total=12_000),), Outcome.FITS_NOWHERE,
        "large needs about 20000 MB; the largest device has 12000 MB",
        smallest_need_mb=20_000, largest_device_mb=12_000),
    "a model too large for every device is fits_nowhere": Nothing(
        ("large",), (dev(total=12_000), dev("gpu:1", total=16_000)), Outcome.FITS_NOWHERE,
        "large needs about 20000 MB; the largest device has 16000 MB",
        smallest_need_mb=20_000, largest_device_mb=16_000),
    "a down device too small as well still makes fits_nowhere": Nothing(
        ("large",), (dev(total=12_000), dev("gpu:1", total=16_000, up=False)),
        Outcome.FITS_NOWHERE, "large needs about 20000 MB; the largest device has 16000 MB",
        smallest_need_mb=20_000, largest_device_mb=16_000),
    "fits_nowhere names the smallest need among a role's models": Nothing(
        ("large", "mid"), (dev(total=8_000),), Outcome.FITS_NOWHERE,
        "large, mid needs about 10000 MB; the largest device has 8000 MB",
        smallest_need_mb=10_000, largest_device_mb=8_000),
    "fits_nowhere ignores devices that do not serve the model": Nothing(
        ("large",), (dev(total=8_000), dev("gpu:1", total=80_000, serves=["small"])),
        Outcome.FITS_NOWHERE, "large needs about 20000 MB; the largest device has 8000 MB",
        smallest_need_mb=20_000, largest_device_mb=8_000),
    "every device at its pending limit is all_busy": Nothing(
        ("small",), (dev(loaded="small", in_flight=2), dev("gpu:1", loaded="mid", pending=2)),
        Outcome.ALL_BUSY, "every device that can serve small is busy", retry_after_s=2.5),
    "at the limit on one device and too small on the rest is all_busy": Nothing(
        ("mid",), (dev(pending=2), dev("gpu:1", total=8_000)),
        Outcome.ALL_BUSY, "every device that can serve mid is busy", retry_after_s=2.5),
    "at the limit on one device and down on the rest is all_busy": Nothing(
        ("mid",), (dev(pending=2), dev("gpu:1", up=False)),
        Outcome.ALL_BUSY, "every device that can serve mid is busy", retry_after_s=2.5),
    "memory held outside rolemesh on every empty device is all_busy": Nothing(
        ("mid",), (dev(free=2_000), dev("gpu:1", free=9_000)),
        Outcome.ALL_BUSY, "every device that can serve mid is busy", retry_after_s=2.5),
}


@pytest.mark.parametrize("case", NOTHINGS.values(), ids=NOTHINGS.keys())
def test_nothing_routed(case: Nothing) -> None:
    decision = choose(case.models, case.devices, BUSY_POLICY)
    assert decision.outcome == case.outcome
    assert (decision.winner, decision.action) == (None, None)
    assert not any(v.chosen for v in decision.verdicts)
    assert decision.explain() == case.explain
    assert decision.retry_after_s == case.retry_after_s
    assert (decision.smallest_need_mb, decision.largest_device_mb) == (
        case.smallest_need_mb, case.largest_device_mb)


@pytest.mark.parametrize("case", NOTHINGS.values(), ids=NOTHINGS.keys())
def test_nothing_routed_regardless_of_input_order(case: Nothing) -> None:
    expected = choose(case.models, case.devices, BUSY_POLICY)
    for devices in itertools.permutations(case.devices):
        decision = choose(tuple(reversed(case.models)), devices, BUSY_POLICY)
        assert decision.outcome == expected.outcome
        assert decision.smallest_need_mb == expected.smallest_need_mb
        assert decision.largest_device_mb == expected.largest_device_mb


def test_the_default_policy_retries_busy_after_one_second() -> None:
    decision = choose(["small"], [dev(in_flight=2)])
    assert (decision.outcome, decision.retry_after_s) == (Outcome.ALL_BUSY, 1.0)


@pytest.mark.parametrize(("devices", "explain"), [
    ([dev("gpu:1", node="n", loaded="small")], "small on n/gpu:1: use_loaded (model_loaded)"),
    ([dev("gpu:0")], "small on a/gpu:0: load_on_empty (fits_empty_device)"),
    ([dev("gpu:0", loaded="mid")], "small on a/gpu:0: evict (evict_idle_model)"),
    ([dev("gpu:0", loaded="mid", in_flight=1)],
     "small on a/gpu:0: switch_after_queue (switch_after_queue)"),
], ids=["use the loaded model", "load on an empty device", "evict an idle model",
        "switch after the queue"])
def test_explain_a_routed_decision(devices: list[DeviceView], explain: str) -> None:
    assert choose(["small"], devices).explain() == explain


# -- properties over random clusters ----------------------------------------------------------

ELIGIBLE = {Reason.MODEL_LOADED, Reason.FITS_EMPTY_DEVICE, Reason.EVICT_IDLE_MODEL,
            Reason.SWITCH_AFTER_QUEUE}


def random_cluster(rng: random.Random) -> tuple[list[str], list[DeviceView], Policy]:
    names = list(MODELS)
    devices = []
    for node in rng.sample(["a", "b", "c"], rng.randint(1, 3)):
        up = rng.random() > 0.15
        serves = rng.sample(names, rng.randint(1, 3))
        for i in range(rng.randint(1, 3)):
            total = rng.choice([None, 8_000, 12_000, 16_000, 24_000, 48_000])
            loaded = rng.choice([None, None, *names])
            state = (rng.choice(list(SlotState)) if loaded else
                     rng.choice([SlotState.EMPTY, SlotState.EMPTY, SlotState.FAILED]))
            free = None if total is None else rng.choice(
                [total, total // 2, 0, total - MODELS[loaded].memory_need_mb if loaded else total])
            limit = rng.randint(1, 4)
            devices.append(DeviceView(
                node_id=node, device_id=f"gpu:{i}", servable={m: MODELS[m] for m in serves},
                memory_total_mb=total, memory_free_mb=free, loaded_model=loaded,
                slot_state=state, in_flight=rng.randint(0, 2), pending=rng.randint(0, 2),
                pending_limit=limit, up=up,
                recent_requests={m: rng.randint(0, 5) for m in names}))
    wanted = rng.sample(names, rng.randint(1, 2))
    policy = Policy(memory_safety_margin=rng.choice([0.8, 0.9, 1.0]))
    return wanted, devices, policy


def eligible_holder(device: DeviceView, wanted: Sequence[str], policy: Policy) -> bool:
    model = device.loaded_model
    return (device.up and device.holds_model and model in wanted and model in device.servable
            and device.queue < device.pending_limit
            and fits_device(device.servable[model], device, policy))


def test_invariants_hold_over_random_clusters() -> None:
    rng = random.Random(20240611)
    outcomes: dict[Outcome, int] = {}
    actions: dict[Action | None, int] = {}
    for _ in range(4_000):
        wanted, devices, policy = random_cluster(rng)
        decision = choose(wanted, devices, policy)
        outcomes[decision.outcome] = outcomes.get(decision.outcome, 0) + 1
        actions[decision.action] = actions.get(decision.action, 0) + 1
        by_key = {d.key: d for d in devices}
        chosen = [v for v in decision.verdicts if v.chosen]
        assert len(decision.verdicts) == sum(m in d.servable for d in devices for m in wanted)
        assert (decision.outcome == Outcome.ROUTED) == any(
            v.reason in ELIGIBLE for v in decision.verdicts)
        if decision.winner is None:
            assert chosen == []
            continue
        w = decision.winner
        device = by_key[(w.node_id, w.device_id)]
        assert chosen == [w]
        assert device.up
        assert device.queue < device.pending_limit
        assert fits_device(device.servable[w.model_id], device, policy)
        if any(eligible_holder(d, wanted, policy) for d in devices):
            assert decision.action == Action.USE_LOADED
            assert device.loaded_model == w.model_id
        if decision.action == Action.EVICT:
            assert device.queue == 0
            assert not any(v.reason == Reason.FITS_EMPTY_DEVICE for v in decision.verdicts)
        if decision.action == Action.SWITCH_AFTER_QUEUE:
            assert not any(v.reason in {Reason.FITS_EMPTY_DEVICE, Reason.EVICT_IDLE_MODEL}
                           for v in decision.verdicts)
        shuffled = rng.sample(devices, len(devices))
        assert where(choose(list(reversed(wanted)), shuffled, policy)) == where(decision)
    # The generator reaches every outcome and action, so the checks above are not vacuous.
    assert set(outcomes) >= {Outcome.ROUTED, Outcome.ALL_BUSY, Outcome.FITS_NOWHERE,
                             Outcome.ALL_DOWN}
    assert set(actions) >= set(Action)


def test_the_fast_path_for_a_loaded_model_decides_exactly_as_judging_every_candidate() -> None:
    from rolemesh.decision import _judge_all  # the reference: every candidate judged

    rng = random.Random(7)
    fast_hits = 0
    for _ in range(3000):
        models, devices, policy = random_cluster(rng)
        wanted = tuple(dict.fromkeys(models))
        fast = choose(models, devices, policy)
        full = _judge_all(wanted, devices, policy)
        assert fast.outcome == full.outcome
        assert fast.action == full.action
        assert fast.winner == full.winner
        assert fast.verdicts == full.verdicts
        fast_hits += fast.judged is None
    assert fast_hits > 100  # the fast path was really exercised
