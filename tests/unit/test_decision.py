"""`choose()`: which device serves a request, as tables of clusters and the expected choice.

Every case is plain data: a list of devices, the models a request names, and what should
win (or why nothing does). The last section throws a few thousand random clusters at it and
checks the rules that must always hold.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest

from rolemesh.api import InstanceState
from rolemesh.decision import (
    Action,
    Decision,
    DeviceView,
    ModelCost,
    Outcome,
    Policy,
    Reason,
    ResidentView,
    Verdict,
    choose,
    fits_device,
    holders_of,
    losing_cost,
)

# Three models a node can serve: memory need (MB) and load time (s).
MODELS: dict[str, ModelCost] = {
    "small": ModelCost(memory_need_mb=4_000, load_s=5.0),
    "mid": ModelCost(memory_need_mb=10_000, load_s=20.0),
    "large": ModelCost(memory_need_mb=20_000, load_s=40.0),
}
UNSET = object()
S = InstanceState


def dev(device_id: str = "gpu:0", *, node: str = "a", total: int | None = 24_000,
        free: int | object | None = UNSET, loaded: str | Sequence[str] | None = None,
        state: InstanceState = S.READY, busy: Mapping[str, int] | None = None,
        in_flight: int = 0, pending: int = 0, limit: int = 2, up: bool = True,
        recent: Mapping[str, int] | None = None, serves: Sequence[str] = tuple(MODELS),
        co: bool = True, pinned: Sequence[str] = (), failed: Mapping[str, float] | None = None,
        held: frozenset[str] | None = None, sets: Mapping[str, frozenset[str]] | None = None,
        draining: bool = False) -> DeviceView:
    """A device holding `loaded` (one model id or several), each charged its full need.

    By default its free memory is its total less what the residents hold, and one resident
    is busy with the device's whole queue (in flight + pending); `busy` says otherwise.
    `co=False` is a node configured with `co_residency: false` (one model at a time).
    """
    names = [loaded] if isinstance(loaded, str) else list(loaded or ())
    if busy is None:
        busy = {names[0]: in_flight + pending} if len(names) == 1 else {}
    residents = tuple(ResidentView(m, state, busy=busy.get(m, 0),
                                   charged_mb=MODELS[m].memory_need_mb, pinned=m in pinned)
                      for m in names)
    if free is UNSET:
        held_mb = sum(MODELS[m].memory_need_mb for m in names
                      if state not in (S.FAILED, S.EMPTY))
        free = None if total is None else total - held_mb
    assert free is None or isinstance(free, int)
    return DeviceView(node_id=node, device_id=device_id,
                      servable={m: MODELS[m] for m in serves}, memory_total_mb=total,
                      memory_free_mb=free, residents=residents, in_flight=in_flight,
                      pending=pending, pending_limit=limit, up=up,
                      recent_requests=dict(recent or {}), held=held, sets=dict(sets or {}),
                      failed=dict(failed or {}), draining=draining, co_residency=co)


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


USE, LOAD, BESIDE, EVICT, SWITCH = (Action.USE_LOADED, Action.LOAD_ON_EMPTY,
                                    Action.LOAD_BESIDE, Action.EVICT, Action.SWITCH_AFTER_QUEUE)

WINS: dict[str, Win] = {
    "a healthy empty device goes before one where a load failed, with more free memory": win(
        "small", [dev("gpu:0", failed={"mid": 3.0}, total=48_000), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    "a device where a load failed is still used when no healthy device fits": win(
        "small", [dev("gpu:0", failed={"mid": 3.0}), dev("gpu:1", loaded="large")],
        "a/gpu:0 small", LOAD),
    # -- rule 3: the model is already loaded ------------------------------------------------
    "a device with the model loaded wins over an empty device": win(
        "small", [dev("gpu:0"), dev("gpu:1", loaded="small")], "a/gpu:1 small", USE),
    "a device with the model loaded wins over loading it beside another model": win(
        "small", [dev("gpu:0", loaded="mid"), dev("gpu:1", loaded="small")],
        "a/gpu:1 small", USE),
    "a device with the model loaded among others wins": win(
        "small", [dev("gpu:0"), dev("gpu:1", loaded=("mid", "small"))], "a/gpu:1 small", USE),
    # Its queue's wait (1 x 10 s) is below a weighted load (4 x 5 s): see
    # test_decision_pressure.py for a queue long enough to be worth a new copy.
    "a loaded device with a short queue still wins over an empty device": win(
        "small", [dev("gpu:0"), dev("gpu:1", loaded="small", in_flight=1, limit=4)],
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
    "a starting instance of the model counts as loaded": win(
        "small", [dev("gpu:0"), dev("gpu:1", loaded="small", state=S.STARTING,
                                    pending=1, limit=4)], "a/gpu:1 small", USE),
    "a draining instance of the model does not count as loaded": win(
        "small", [dev("gpu:0", loaded="small", state=S.DRAINING), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    "a stopping instance of the model does not count as loaded": win(
        "small", [dev("gpu:0", loaded="small", state=S.STOPPING), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    "a failed instance of the model does not count as loaded": win(
        "small", [dev("gpu:0", loaded="small", state=S.FAILED), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    "a loaded device at its pending limit is passed over for an empty one": win(
        "small", [dev("gpu:0", loaded="small", in_flight=1, pending=1), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    "a loaded device on a down node is passed over for an empty one": win(
        "small", [dev("gpu:0", loaded="small", up=False), dev("gpu:0", node="b")],
        "b/gpu:0 small", LOAD),
    "a loaded device on a draining node is passed over for an empty one": win(
        "small", [dev("gpu:0", loaded="small", draining=True), dev("gpu:0", node="b")],
        "b/gpu:0 small", LOAD),
    "a loaded device where the model is backing off is passed over": win(
        "small", [dev("gpu:0", loaded="small", failed={"small": 4.0}), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    # -- rule 4: room on a device (empty, or beside the residents) ---------------------------
    "the best fit wins: least room left over, so big rooms stay free": win(
        "small", [dev("gpu:0", free=10_000), dev("gpu:1", free=20_000), dev("gpu:2", free=8_000)],
        "a/gpu:2 small", LOAD),
    "a better fit beats more room": win(
        "small", [dev("gpu:0", free=10_000), dev("gpu:1", free=20_000)],
        "a/gpu:0 small", LOAD),
    "between equal fits the least queue wins": win(
        "small", [dev("gpu:0", pending=1, limit=4), dev("gpu:1")], "a/gpu:1 small", LOAD),
    "a device with known free memory wins over one with unknown free memory": win(
        "small", [dev("gpu:0", total=None, free=None), dev("gpu:1", free=5_000)],
        "a/gpu:1 small", LOAD),
    "a device of unknown size is used when it is the only one": win(
        "large", [dev("cpu", total=None, free=None)], "a/cpu large", LOAD),
    "a model that fits beside a resident loads there without evicting it": win(
        "small", [dev("gpu:0", loaded="mid")], "a/gpu:0 small", BESIDE),
    "loading beside an idle model beats evicting one elsewhere": win(
        "small", [dev("gpu:0", loaded="large"), dev("gpu:1", loaded="mid")],
        "a/gpu:1 small", BESIDE),
    "a device without busy neighbours goes before a better fit beside a busy model": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, limit=4), dev("gpu:1")],
        "a/gpu:1 small", LOAD),
    "beside an idle model a better fit beats an empty device": win(
        "small", [dev("gpu:0", loaded="mid"), dev("gpu:1")], "a/gpu:0 small", BESIDE),
    "beside a busy model is still better than evicting an idle one in demand": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, limit=4),
                  dev("gpu:1", loaded="large", recent={"large": 5})], "a/gpu:0 small", BESIDE),
    "evicting an idle model nobody asked for beats sharing a busy device": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, limit=4),
                  dev("gpu:1", loaded="large")], "a/gpu:1 small", EVICT),
    "an empty device with too little free memory loses to loading beside elsewhere": win(
        "mid", [dev("gpu:0", free=3_000), dev("gpu:1", loaded="small")],
        "a/gpu:1 mid", BESIDE),
    "an empty device without enough free memory loses to an eviction (co_residency off)": win(
        "mid", [dev("gpu:0", free=3_000, co=False), dev("gpu:1", loaded="small", co=False)],
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
        "a/gpu:1 mid", BESIDE),
    "a device held for a set without the model is passed over": win(
        "small", [dev("gpu:0", held=frozenset({"mid"})), dev("gpu:1", free=5_000)],
        "a/gpu:1 small", LOAD),
    "a device held for a set with the model takes it": win(
        "small", [dev("gpu:0", held=frozenset({"small", "mid"}), free=5_000), dev("gpu:1")],
        "a/gpu:0 small", LOAD),
    # -- rule 5: evict idle instances ------------------------------------------------------
    "without room beside, the cheapest idle instance on any device is evicted": win(
        "mid", [dev("gpu:0", loaded=("small", "large"), recent={"small": 10, "large": 1})],
        "a/gpu:0 mid", EVICT),
    # Both are likely wanted within the horizon (1 - e^(-10/600 x 300) = 0.99, and 0.78):
    # the expected reloads are 0.99 x 4 x 20 = 79 s against 0.78 x 4 x 40 = 124 s.
    "eviction picks the cheapest expected reload, not requests times load time": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 10}, co=False),
                  dev("gpu:1", loaded="large", recent={"large": 3}, co=False)],
        "a/gpu:0 small", EVICT),
    "eviction spares a model wanted often for one wanted rarely": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 10}, co=False),
                  dev("gpu:1", loaded="large", recent={"large": 1}, co=False)],
        "a/gpu:1 small", EVICT),
    "eviction weighs load time, not only request counts": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 5}, co=False),       # 5 x 20 = 100
                  dev("gpu:1", loaded="large", recent={"large": 3}, co=False)],  # 3 x 40 = 120
        "a/gpu:0 small", EVICT),
    "a model with no recent requests is the cheapest to evict": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 1}, co=False),
                  dev("gpu:1", loaded="large", co=False)],
        "a/gpu:1 small", EVICT),
    "a model loaded on two devices costs nothing to lose": win(
        "small", [dev("gpu:0", loaded="large", recent={"large": 1}, co=False),
                  dev("gpu:1", loaded="mid", recent={"mid": 100}, co=False),
                  dev("gpu:2", loaded="mid", recent={"mid": 100}, in_flight=1, limit=4,
                      co=False)],
        "a/gpu:1 small", EVICT),
    "a copy on a down node does not make a model free to lose": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 100}, co=False),
                  dev("gpu:1", loaded="large", recent={"large": 1}, co=False),
                  dev("gpu:0", node="b", loaded="mid", up=False, co=False)],
        "a/gpu:1 small", EVICT),
    "a draining copy does not make a model free to lose": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 100}, co=False),
                  dev("gpu:1", loaded="large", recent={"large": 1}, co=False),
                  dev("gpu:2", loaded="mid", state=S.DRAINING, free=0, in_flight=7, limit=8,
                      co=False)],
        "a/gpu:1 small", EVICT),
    "the room a leaving model gives back is cheapest when nothing waits there": win(
        "small", [dev("gpu:0", loaded="mid", recent={"mid": 100}, co=False),
                  dev("gpu:1", loaded="large", recent={"large": 1}, co=False),
                  dev("gpu:2", loaded="mid", state=S.DRAINING, free=0, co=False)],
        "a/gpu:2 small", SWITCH),
    "between equally cheap evictions the best fit wins": win(
        "small", [dev("gpu:0", loaded="mid", total=16_000, co=False),
                  dev("gpu:1", loaded="mid", co=False)],
        "a/gpu:0 small", EVICT),
    "between identical evictions the lowest device id wins": win(
        "small", [dev("gpu:1", loaded="mid", co=False), dev("gpu:0", loaded="mid", co=False)],
        "a/gpu:0 small", EVICT),
    # The switch waits for mid's one request (10 s), loads small (20 s) and may reload mid
    # (0.39 x 80 s); the eviction's reload of large, wanted 1,000 times, is 160 s.
    "waiting for a busy model beats evicting an idle one in heavy demand": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, limit=4, co=False),
                  dev("gpu:1", loaded="large", recent={"large": 1_000}, co=False)],
        "a/gpu:0 small", SWITCH),
    "evicting an idle model beats waiting when the idle one is rarely wanted": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, limit=4, recent={"mid": 50},
                      co=False),
                  dev("gpu:1", loaded="large", recent={"large": 1}, co=False)],
        "a/gpu:1 small", EVICT),
    "a busy neighbour is left alone while an idle one beside it is evicted": win(
        "large", [dev("gpu:0", total=30_000, loaded=("small", "mid"), busy={"small": 1},
                      in_flight=1, limit=4, recent={"mid": 50})],
        "a/gpu:0 large", EVICT),
    "a pinned model is never evicted: the device without one is used": win(
        "large", [dev("gpu:0", loaded="mid", pinned=["mid"]),
                  dev("gpu:1", loaded="mid", recent={"mid": 1_000})],
        "a/gpu:1 large", EVICT),
    # -- rule 6: queue behind busy instances and switch after ------------------------------
    "a starting model with no queue is still loading: the switch waits for it": win(
        "small", [dev("gpu:0", loaded="mid", state=S.STARTING, co=False)],
        "a/gpu:0 small", SWITCH),
    # gpu:0: 20 s queue + 20 s load + 0.39 x 80 s reload of mid = 71 s; gpu:1: 10 + 20 +
    # 0.39 x 160 s reload of large = 93 s. The queue alone would pick gpu:1.
    "with every device busy the switch goes where queue + load + reload cost least": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, pending=1, limit=4, co=False),
                  dev("gpu:1", loaded="large", in_flight=1, limit=4, co=False)],
        "a/gpu:0 small", SWITCH),
    "with equally costly switches the request queues on the one with the least queue": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, pending=1, limit=4, co=False),
                  dev("gpu:1", loaded="mid", in_flight=1, limit=4, co=False)],
        "a/gpu:1 small", SWITCH),
    "with equal queues the switch goes where the loaded model is cheaper to lose": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, limit=4, recent={"mid": 10}, co=False),
                  dev("gpu:1", loaded="large", in_flight=1, limit=4, recent={"large": 1},
                      co=False)],
        "a/gpu:1 small", SWITCH),
    "a switch is only chosen when no free room or idle model is left": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, limit=4, co=False),
                  dev("gpu:1", loaded="large", in_flight=1, limit=4, co=False),
                  dev("gpu:2", free=5_000, co=False)],
        "a/gpu:2 small", LOAD),
    "a busy device at its pending limit gets no switch": win(
        "small", [dev("gpu:0", loaded="mid", in_flight=1, pending=1, co=False),
                  dev("gpu:1", loaded="large", in_flight=1, pending=2, limit=4, co=False)],
        "a/gpu:1 small", SWITCH),
    "with co-residency a busy resident is waited for only when nothing fits beside it": win(
        "mid", [dev("gpu:0", loaded="large", in_flight=1, limit=4)], "a/gpu:0 mid", SWITCH),
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
    "a role's models on one empty device: the smaller loads, leaving more for others": win(
        ("small", "mid"), [dev("gpu:0")], "a/gpu:0 small", LOAD),
    "a role's model that loads sooner wins between empty devices": win(
        ("small", "mid"), [dev("gpu:0", serves=["mid"], free=10_000),
                           dev("gpu:1", serves=["small"])], "a/gpu:1 small", LOAD),
    "a role spans nodes that serve different models of it: the best fit wins": win(
        ("small", "mid"), [dev("gpu:0", serves=["small"], free=6_000),
                           dev("gpu:0", node="b", serves=["mid"], free=20_000)],
        "a/gpu:0 small", LOAD),
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
    "a ready instance of the model is model_loaded": (dev(loaded="small"), Reason.MODEL_LOADED),
    "a ready instance among others is model_loaded":
        (dev(loaded=("mid", "small")), Reason.MODEL_LOADED),
    "a starting instance of the model is model_loaded":
        (dev(loaded="small", state=S.STARTING), Reason.MODEL_LOADED),
    "a draining instance of the model: a new one only after it":
        (dev(loaded="small", state=S.DRAINING), Reason.SWITCH_AFTER_QUEUE),
    "a draining instance of the model: only after it, whatever the free memory":
        (dev(loaded="small", state=S.DRAINING, free=1_000), Reason.SWITCH_AFTER_QUEUE),
    "a stopping instance of the model: a new one only after it":
        (dev(loaded="small", state=S.STOPPING, free=24_000),
         Reason.SWITCH_AFTER_QUEUE),
    "a failed instance of the model is treated as gone":
        (dev(loaded="small", state=S.FAILED, free=24_000), Reason.FITS_EMPTY_DEVICE),
    "a draining node is node_draining, even with the model loaded":
        (dev(loaded="small", draining=True), Reason.NODE_DRAINING),
    "a model backing off after a failed load is recently_failed":
        (dev(failed={"small": 2.0}), Reason.RECENTLY_FAILED),
    "another model's failure does not exclude the device":
        (dev(failed={"mid": 2.0}), Reason.FITS_EMPTY_DEVICE),
    "a device held for a set without the model is held_for_set":
        (dev(held=frozenset({"mid"})), Reason.HELD_FOR_SET),
    "a device held for a set with the model is a candidate":
        (dev(held=frozenset({"small"})), Reason.FITS_EMPTY_DEVICE),
    "with declared sets, a model in no set shared with the residents evicts them":
        (dev(loaded="mid", sets={"s": frozenset({"mid", "large"})}),
         Reason.EVICT_IDLE_MODEL),
    "with declared sets, a model in the residents' set loads beside them":
        (dev(loaded="mid", sets={"s": frozenset({"mid", "small"})}), Reason.FITS_BESIDE),
    "only a pinned model could make room: no_room":
        (dev(loaded="large", pinned=["large"]), Reason.NO_ROOM),
    "a pinned model with room beside it stays and the model loads beside":
        (dev(loaded="mid", pinned=["mid"]), Reason.FITS_BESIDE),
    "an empty device with enough free memory is fits_empty_device":
        (dev(), Reason.FITS_EMPTY_DEVICE),
    "free memory exactly equal to the need is enough":
        (dev(free=4_000), Reason.FITS_EMPTY_DEVICE),
    "free memory one MB short of the need is not_enough_free_memory":
        (dev(free=3_999), Reason.NOT_ENOUGH_FREE_MEMORY),
    "unknown free memory on an empty device is treated as fitting":
        (dev(free=None), Reason.FITS_EMPTY_DEVICE),
    "free memory counts what an evicted model gives back":
        (dev(loaded="mid", free=0), Reason.EVICT_IDLE_MODEL),
    "another model loaded with room beside it is fits_beside":
        (dev(loaded="mid"), Reason.FITS_BESIDE),
    "another model with room beside it but co_residency off is evict_idle_model":
        (dev(loaded="mid", co=False), Reason.EVICT_IDLE_MODEL),
    "another model loaded and idle, no room beside it, is evict_idle_model":
        (dev(loaded="large"), Reason.EVICT_IDLE_MODEL),
    "another model starting with room beside it is fits_beside":
        (dev(loaded="mid", state=S.STARTING), Reason.FITS_BESIDE),
    "another model starting without room beside it is switch_after_queue":
        (dev(loaded="large", state=S.STARTING), Reason.SWITCH_AFTER_QUEUE),
    "another model with a request in flight and no room beside is switch_after_queue":
        (dev(loaded="large", in_flight=1), Reason.SWITCH_AFTER_QUEUE),
    "another model with a request waiting and no room beside is switch_after_queue":
        (dev(loaded="large", pending=1), Reason.SWITCH_AFTER_QUEUE),
    "a busy model with room beside it is fits_beside: it keeps serving":
        (dev(loaded="mid", in_flight=1), Reason.FITS_BESIDE),
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
    device = dev("gpu:3", node="n", loaded="large", free=3_000, in_flight=1, pending=2,
                 limit=5, recent={"large": 7})
    (v,) = choose(["small"], [device]).verdicts
    # Room left: min(24,000 x 0.9 - 20,000 charged, 3,000 reported free) = 1,600 MB.
    # Expected: 3 queued x 10 s + 4 x 5 s load + large's reload, 4 x 40 s times the chance
    # it is wanted within 120 s (1 - e^(-7/600 x 120) = 0.75).
    regret = (1 - math.exp(-7 / 600 * 120)) * 4 * 40
    assert v == Verdict(node_id="n", device_id="gpu:3", model_id="small",
                        reason=Reason.SWITCH_AFTER_QUEUE, chosen=True, queue=3,
                        memory_need_mb=4_000, memory_total_mb=24_000, memory_free_mb=1_600,
                        eviction_cost=280.0, evicts=("large",), expected_s=50.0 + regret,
                        wait_s=30.0, load_s=20.0, regret_s=regret)


def test_a_verdict_beside_busy_residents_says_so() -> None:
    (v,) = choose(["small"], [dev("gpu:0", loaded="mid", in_flight=1)]).verdicts
    assert (v.reason, v.busy_neighbours, v.memory_free_mb) == (Reason.FITS_BESIDE, True, 11_600)


def test_an_eviction_verdict_names_the_model_it_evicts_and_its_cost() -> None:
    decision = choose(["small"], [dev("gpu:0", loaded="large", recent={"large": 2})])
    assert decision.action == Action.EVICT
    assert decision.winner is not None
    assert (decision.winner.evicts, decision.winner.eviction_cost) == (("large",), 80.0)


def test_an_eviction_names_every_model_of_the_cheapest_set() -> None:
    device = dev("gpu:0", loaded=("small", "mid"),
                 recent={"small": 1, "mid": 1})  # 21,600 usable: large needs both gone
    decision = choose(["large"], [device])
    assert decision.action == Action.EVICT
    assert decision.winner is not None
    assert (decision.winner.evicts, decision.winner.eviction_cost) == (("mid", "small"), 25.0)
    assert decision.explain() == ("large on a/gpu:0: evict (evict_idle_model, stopping mid, "
                                  "small)")


def test_verdicts_that_evict_nothing_carry_no_eviction_figures() -> None:
    decision = choose(["small"], [dev("gpu:0"), dev("gpu:1", loaded="small"),
                                  dev("gpu:2", up=False)])
    assert {(v.evicts, v.eviction_cost) for v in decision.verdicts} == {((), None)}


# -- eviction cost and fit, on their own --------------------------------------------------

@pytest.mark.parametrize(("device", "model", "holders", "cost"), [
    (dev(loaded="mid", recent={"mid": 3}), "mid", {"mid": 1}, 60.0),
    (dev(loaded="mid", recent={"mid": 3}), "mid", {"mid": 2}, 0.0),
    (dev(loaded="mid"), "mid", {"mid": 1}, 0.0),
    (dev(loaded=("mid", "small"), recent={"mid": 3, "small": 2}), "small", {"small": 1}, 10.0),
    (dev(loaded="large", recent={"large": 1}, serves=["small"]), "large", {"large": 1}, 1.0),
], ids=[
    "recent requests times load time",
    "nothing when another device holds the model too",
    "nothing when the model had no recent requests",
    "each resident costs its own requests and load time",
    "a load time of one second when the node does not list the model",
])
def test_losing_cost(device: DeviceView, model: str, holders: dict[str, int],
                     cost: float) -> None:
    assert losing_cost(device, model, holders) == cost


def test_holders_count_up_placements_that_hold_a_model() -> None:
    devices = [dev("gpu:0", loaded=("mid", "small")), dev("gpu:1", loaded="mid"),
               dev("gpu:2", loaded="mid", state=S.DRAINING), dev("gpu:3", loaded="mid", up=False)]
    assert holders_of(devices) == {"mid": 2, "small": 1}


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
    ([dev("gpu:0", loaded="mid")], "small on a/gpu:0: load_beside (fits_beside)"),
    ([dev("gpu:0", loaded="large")],
     "small on a/gpu:0: evict (evict_idle_model, stopping large)"),
    ([dev("gpu:0", loaded="large", in_flight=1)],
     "small on a/gpu:0: switch_after_queue (switch_after_queue, stopping large)"),
], ids=["use the loaded model", "load on an empty device", "load beside a resident",
        "evict an idle model", "switch after the queue"])
def test_explain_a_routed_decision(devices: list[DeviceView], explain: str) -> None:
    assert choose(["small"], devices).explain() == explain


# -- properties over random clusters ----------------------------------------------------------

ELIGIBLE = {Reason.MODEL_LOADED, Reason.FITS_EMPTY_DEVICE, Reason.FITS_BESIDE,
            Reason.EVICT_IDLE_MODEL, Reason.SWITCH_AFTER_QUEUE}
STATES = [S.READY, S.READY, S.STARTING, S.DRAINING, S.STOPPING, S.FAILED]


def random_cluster(rng: random.Random) -> tuple[list[str], list[DeviceView], Policy]:
    names = list(MODELS)
    devices = []
    for node in rng.sample(["a", "b", "c"], rng.randint(1, 3)):
        up = rng.random() > 0.15
        draining = rng.random() < 0.1
        co = rng.random() > 0.2
        serves = rng.sample(names, rng.randint(1, 3))
        sets = rng.choice([{}, {}, {"s": frozenset(rng.sample(names, 2))}])
        costs = {m: replace(MODELS[m], service_s=rng.choice([None, None, 0.5, 4.0, 30.0]))
                 for m in serves}  # measured on this node, or not yet
        for i in range(rng.randint(1, 3)):
            total = rng.choice([None, 8_000, 12_000, 16_000, 24_000, 48_000])
            loaded = rng.sample(names, rng.choice([0, 0, 1, 1, 2, 3]))
            residents = tuple(ResidentView(
                m, rng.choice(STATES), busy=rng.choice([0, 0, 1, 2]),
                charged_mb=MODELS[m].memory_need_mb, pinned=rng.random() < 0.15)
                for m in loaded)
            charged = sum(r.charged_mb for r in residents)
            free = None if total is None else rng.choice(
                [total, total // 2, 0, max(0, total - charged)])
            failed = {m: 1.5 for m in names if rng.random() < 0.08}
            held = frozenset(rng.sample(names, 2)) if rng.random() < 0.1 else None
            devices.append(DeviceView(
                node_id=node, device_id=f"gpu:{i}", servable=costs,
                memory_total_mb=total, memory_free_mb=free, residents=residents,
                in_flight=rng.randint(0, 2), pending=rng.randint(0, 2),
                pending_limit=rng.randint(1, 4), up=up,
                recent_requests={m: rng.randint(0, 5) for m in names}, held=held, sets=sets,
                failed=failed, draining=draining, co_residency=co))
    wanted = rng.sample(names, rng.randint(1, 2))
    policy = Policy(memory_safety_margin=rng.choice([0.8, 0.9, 1.0]),
                    idle_load_weight=rng.choice([None, None, 1.0, 2.0]))
    return wanted, devices, policy


def eligible_holder(device: DeviceView, wanted: Sequence[str], policy: Policy,
                    ready_only: bool = False) -> bool:
    return any(
        device.up and not device.draining and r.holds and r.model_id in wanted
        and (r.state is S.READY or not ready_only)
        and r.model_id in device.servable and r.model_id not in device.failed
        and (device.held is None or r.model_id in device.held)
        and device.queue < device.pending_limit
        and fits_device(device.servable[r.model_id], device, policy)
        for r in device.residents)


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
        # Routed when a candidate can take it, unless waiting for a busy copy costs less.
        assert (decision.outcome == Outcome.ROUTED) == (any(
            v.reason in ELIGIBLE for v in decision.verdicts) and decision.waits_for is None)
        if decision.winner is None:
            assert chosen == []
            continue
        w = decision.winner
        device = by_key[(w.node_id, w.device_id)]
        assert chosen == [w]
        assert device.up
        assert not device.draining
        assert device.queue < device.pending_limit
        assert w.model_id not in device.failed
        assert device.held is None or w.model_id in device.held
        assert fits_device(device.servable[w.model_id], device, policy)
        residents = {r.model_id: r for r in device.residents}
        # An idle copy costs nothing; one still loading costs half its load, which a load
        # on an idle device priced at idle_load_weight may beat: then only a READY one.
        ready_only = policy.idle_load_weight is not None
        if any(eligible_holder(d, wanted, policy, ready_only) and d.queue == 0
               for d in devices):
            assert decision.action == Action.USE_LOADED
            assert residents[w.model_id].holds
        # The cost model: nothing that could serve it is expected to serve it sooner.
        assert all(w.expected_s is not None and w.expected_s <= v.expected_s + 1e-6
                   for v in decision.verdicts if v.expected_s is not None)
        if decision.action in (Action.EVICT, Action.LOAD_BESIDE, Action.LOAD_ON_EMPTY):
            # Nothing busy or pinned is stopped under its users.
            assert all(not residents[m].busy and residents[m].state is not S.STARTING
                       and not residents[m].pinned for m in w.evicts)
        if decision.action == Action.EVICT:
            assert w.evicts
        assert all(not residents[m].pinned for m in w.evicts)
        shuffled = rng.sample(devices, len(devices))
        assert where(choose(list(reversed(wanted)), shuffled, policy)) == where(decision)
    # The generator reaches every outcome and action, so the checks above are not vacuous.
    assert set(outcomes) >= {Outcome.ROUTED, Outcome.ALL_BUSY, Outcome.FITS_NOWHERE,
                             Outcome.ALL_DOWN}
    assert set(actions) >= set(Action)


def with_splits_and_host_parts(rng: random.Random, devices: list[DeviceView]
                               ) -> list[DeviceView]:
    """The random cluster, with a model split over a node's gpu:0+gpu:1 now and then (an
    instance of it loaded or not), and host RAM parts that may not fit the node now."""
    nodes = sorted({d.node_id for d in devices})
    split_on = {n for n in nodes if rng.random() < 0.3
                and sum(d.node_id == n for d in devices) >= 2}
    out = []
    for node in nodes:
        mine = [d for d in devices if d.node_id == node]
        costs = dict(mine[0].servable)
        for m, cost in list(costs.items()):
            if rng.random() < 0.2:
                costs[m] = replace(cost, host_need_mb=rng.choice([2_000, 40_000]))
        split = rng.choice(sorted(costs)) if node in split_on else None
        if split is not None:
            costs[split] = replace(costs[split], devices=("gpu:0", "gpu:1"))
        loaded = split is not None and rng.random() < 0.6
        busy = rng.choice([0, 1])
        state = rng.choice([S.READY, S.READY, S.STARTING])
        for d in mine:
            residents = tuple(r for r in d.residents if r.model_id != split)
            if loaded and d.device_id in ("gpu:0", "gpu:1"):
                residents += (ResidentView(split, state, busy=busy, charged_mb=1_000,
                                           devices=("gpu:0", "gpu:1")),)
            out.append(replace(d, servable=costs, residents=residents,
                               host_available_mb=rng.choice([None, 1_000, 64_000])))
    return out


def test_the_fast_path_and_the_bound_decide_exactly_as_judging_every_candidate() -> None:
    from rolemesh.decision import ServiceTimes, _judge_all  # the reference: all judged

    rng = random.Random(7)
    lazy = pruned = 0
    for _ in range(4000):
        models, devices, policy = random_cluster(rng)
        devices = with_splits_and_host_parts(rng, devices)
        wanted = tuple(dict.fromkeys(models))
        measured = {m: rng.choice([0.2, 8.0, 40.0]) for m in wanted if rng.random() < 0.5}
        held_ahead = rng.choice([0, 0, 1, 3])
        counted = CountingJudge()
        with counted:
            fast = choose(models, devices, policy, held_ahead, measured=measured)
        full = _judge_all(wanted, devices, policy, ServiceTimes(measured, policy), held_ahead)
        assert fast.outcome == full.outcome
        assert fast.action == full.action
        assert fast.winner == full.winner
        assert fast.waits_for == full.waits_for
        assert fast.retry_after_s == full.retry_after_s
        lazy += fast.judged is None
        pruned += counted.calls < len(full.verdicts)
        assert fast.verdicts == full.verdicts  # read: judged in full, the same
    assert lazy > 100  # the fast path and the bound were really exercised
    assert pruned > 100


class CountingJudge:
    """Counts the candidates `choose` judges (the bound's point is to judge fewer)."""

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> CountingJudge:
        from rolemesh import decision

        self._module, self._judge = decision, decision._judge

        def counting(*args: Any, **kwargs: Any) -> Any:
            if not kwargs.get("over_limit"):
                self.calls += 1
            return self._judge(*args, **kwargs)

        decision._judge = counting
        return self

    def __exit__(self, *exc: object) -> None:
        self._module._judge = self._judge  # type: ignore[assignment]


def test_the_bound_judges_few_candidates_of_a_big_busy_cluster() -> None:
    # 200 devices, each with a queue for its own copy of a; empty devices elsewhere. A copy
    # waits 3 x 10 s; a load on an empty device costs 4 x 5 s: that wins, and the bound
    # leaves the copies past the first few and the busy devices' loads unjudged.
    cost = ModelCost(8_000, load_s=5.0)
    busy = [DeviceView(f"n{i}", "gpu:0", {"a": cost}, memory_total_mb=24_000,
                       residents=(ResidentView("a", busy=3, charged_mb=8_000),),
                       in_flight=1, pending=2, pending_limit=8) for i in range(200)]
    empty = [DeviceView(f"e{i}", "gpu:0", {"a": cost}, memory_total_mb=24_000 + i)
             for i in range(3)]
    counted = CountingJudge()
    with counted:
        decision = choose(["a"], [*busy, *empty])
    assert decision.action is Action.LOAD_ON_EMPTY
    assert decision.winner is not None
    assert decision.winner.node_id == "e0"  # best fit
    assert counted.calls == 3  # only the empty devices: every copy's wait bounds it out
    assert len(decision.verdicts) == 203  # read, they are all there
    assert sum(v.chosen for v in decision.verdicts) == 1


def test_an_idle_copy_split_over_two_gpus_wins_over_a_busy_single_copy() -> None:
    single = ModelCost(8_000, load_s=10.0)
    split = replace(single, devices=("gpu:0", "gpu:1"))
    resident = ResidentView("a", charged_mb=4_000, devices=("gpu:0", "gpu:1"))
    devices = [DeviceView("n1", "gpu:0", {"a": single}, memory_total_mb=24_000,
                          residents=(ResidentView("a", busy=1, charged_mb=8_000),),
                          in_flight=1, pending_limit=4),
               *(DeviceView("n2", g, {"a": split}, memory_total_mb=24_000,
                            residents=(resident,), pending_limit=4)
                 for g in ("gpu:0", "gpu:1"))]
    decision = choose(["a"], devices)
    assert decision.action is Action.USE_LOADED
    assert decision.winner is not None
    assert (decision.winner.node_id, decision.winner.device_id) == ("n2", "gpu:0+gpu:1")
    assert decision.winner.expected_s == 0.0
