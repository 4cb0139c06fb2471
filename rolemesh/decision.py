"""Which device serves a request: a pure function of data.

No I/O, no logging, no clock. The dispatcher calls it over the whole cluster, the node
agent over its own devices; both render the returned `Decision` (the winner plus a verdict
per candidate) for `/v1/route`, errors and logs.

The rules, in order (see docs/scheduling.md for why):
1. candidates: every (device, model) where the device's node serves one of the models;
2. drop devices that are down, at their pending limit, or too small for the model;
3. a device that already has the model (ready or starting) wins, least queue first;
4. else an empty device where the model fits: most free memory, then least queue;
5. else evict, on an idle device, the loaded model that is cheapest to lose
   (recent requests x its load time; free when it is loaded on another device too);
6. else queue behind a busy device's current work and switch when it drains (the agent
   bounds that wait), least queue first; a busy model is never evicted under its users;
7. else nothing, with a reason the client can act on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from rolemesh.api import SlotState


class Reason(StrEnum):
    NODE_DOWN = "node_down"
    AT_PENDING_LIMIT = "at_pending_limit"
    DOES_NOT_FIT = "does_not_fit"
    NOT_ENOUGH_FREE_MEMORY = "not_enough_free_memory"
    MODEL_LOADED = "model_loaded"
    FITS_EMPTY_DEVICE = "fits_empty_device"
    EVICT_IDLE_MODEL = "evict_idle_model"
    SWITCH_AFTER_QUEUE = "switch_after_queue"


class Action(StrEnum):
    USE_LOADED = "use_loaded"
    LOAD_ON_EMPTY = "load_on_empty"
    EVICT = "evict"
    SWITCH_AFTER_QUEUE = "switch_after_queue"


class Outcome(StrEnum):
    ROUTED = "routed"
    ALL_BUSY = "all_busy"
    FITS_NOWHERE = "fits_nowhere"
    ALL_DOWN = "all_down"
    NO_CANDIDATES = "no_candidates"


_RULE_OF_REASON: dict[Reason, Action] = {
    Reason.MODEL_LOADED: Action.USE_LOADED,
    Reason.FITS_EMPTY_DEVICE: Action.LOAD_ON_EMPTY,
    Reason.EVICT_IDLE_MODEL: Action.EVICT,
    Reason.SWITCH_AFTER_QUEUE: Action.SWITCH_AFTER_QUEUE,
}

_LOADED_STATES = frozenset({SlotState.READY, SlotState.STARTING})
_SWITCHING_STATES = frozenset({SlotState.DRAINING, SlotState.STOPPING})


@dataclass(frozen=True)
class ModelCost:
    """What a model costs on one node: memory to hold it, seconds to load it."""

    memory_need_mb: int
    load_s: float = 1.0


@dataclass(frozen=True)
class DeviceView:
    """Everything the decision needs to know about one device."""

    node_id: str
    device_id: str
    servable: Mapping[str, ModelCost]  # model id -> cost, for the models its node serves
    memory_total_mb: int | None = None
    memory_free_mb: int | None = None
    loaded_model: str | None = None
    slot_state: SlotState = SlotState.EMPTY
    in_flight: int = 0
    pending: int = 0
    pending_limit: int = 2
    up: bool = True
    recent_requests: Mapping[str, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.node_id, self.device_id)

    @property
    def queue(self) -> int:
        return self.in_flight + self.pending

    @property
    def holds_model(self) -> bool:
        return self.loaded_model is not None and self.slot_state in _LOADED_STATES


@dataclass(frozen=True)
class Policy:
    memory_safety_margin: float = 0.9  # a model fits when need <= total x margin
    busy_retry_after_s: float = 1.0


@dataclass(frozen=True)
class Verdict:
    node_id: str
    device_id: str
    model_id: str
    reason: Reason
    chosen: bool = False
    queue: int = 0
    memory_need_mb: int | None = None
    memory_total_mb: int | None = None
    memory_free_mb: int | None = None
    eviction_cost: float | None = None  # for evictions: what losing the loaded model costs
    evicts: str | None = None
    recently_failed: bool = False  # its slot is `failed`: its last start or process died


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    model_ids: tuple[str, ...]
    judged: tuple[Verdict, ...] | None  # None: judged only when `verdicts` is first read
    winner: Verdict | None = None
    action: Action | None = None
    retry_after_s: float | None = None
    # For FITS_NOWHERE: the smallest need among the models and the largest device seen.
    smallest_need_mb: int | None = None
    largest_device_mb: int | None = None
    judge_all: Callable[[], Decision] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def verdicts(self) -> tuple[Verdict, ...]:
        """A verdict for every candidate (device, model), the winner's marked `chosen`."""
        if self.judged is not None:
            return self.judged
        assert self.judge_all is not None
        return self.judge_all().verdicts

    def explain(self) -> str:
        if self.winner is not None and self.action is not None:
            w = self.winner
            return (f"{w.model_id} on {w.node_id}/{w.device_id}: {self.action.value} "
                    f"({w.reason.value})")
        names = ", ".join(self.model_ids)
        match self.outcome:
            case Outcome.NO_CANDIDATES:
                return f"no node serves {names}"
            case Outcome.ALL_DOWN if all(v.reason == Reason.NODE_DOWN for v in self.verdicts):
                return f"every node that serves {names} is down"
            case Outcome.ALL_DOWN:
                return f"every device large enough for {names} is down"
            case Outcome.FITS_NOWHERE:
                return (f"{names} needs about {self.smallest_need_mb} MB; the largest device "
                        f"has {self.largest_device_mb} MB")
            case _:
                return f"every device that can serve {names} is busy"


def fits_device(cost: ModelCost, device: DeviceView, policy: Policy) -> bool:
    return _fits(cost.memory_need_mb, device.memory_total_mb, policy)


def _fits(need_mb: int | None, total_mb: int | None, policy: Policy) -> bool:
    if need_mb is None or total_mb is None:
        return True  # unknown size: the load itself will tell
    return need_mb <= total_mb * policy.memory_safety_margin


def eviction_cost(device: DeviceView, holders: Mapping[str, int]) -> float:
    """What losing `device`'s loaded model costs: zero if another device holds it too."""
    model = device.loaded_model
    if model is None:
        return 0.0
    if holders.get(model, 0) > 1:
        return 0.0
    cost = device.servable.get(model)
    load_s = cost.load_s if cost is not None else 1.0
    return device.recent_requests.get(model, 0) * load_s


# Every key ends with (node, device, model): a tie never depends on input order.
_RANK: dict[Reason, Callable[[Verdict], tuple[Any, ...]]] = {
    Reason.MODEL_LOADED: lambda v: (v.queue, -(v.memory_free_mb or 0),
                                    v.node_id, v.device_id, v.model_id),
    # A failed slot is empty too, but whatever broke it may break the next load as well:
    # a healthy empty device goes first.
    Reason.FITS_EMPTY_DEVICE: lambda v: (v.recently_failed, -(v.memory_free_mb or 0), v.queue,
                                         v.node_id, v.device_id, v.model_id),
    Reason.EVICT_IDLE_MODEL: lambda v: (v.eviction_cost or 0.0, -(v.memory_total_mb or 0),
                                        v.node_id, v.device_id, v.model_id),
    Reason.SWITCH_AFTER_QUEUE: lambda v: (v.queue, v.eviction_cost or 0.0,
                                          v.node_id, v.device_id, v.model_id),
}


_DEFAULT_POLICY = Policy()


def choose(model_ids: Sequence[str], devices: Sequence[DeviceView],
           policy: Policy | None = None) -> Decision:
    policy = policy or _DEFAULT_POLICY
    wanted = tuple(dict.fromkeys(model_ids))
    fast = _use_loaded_fast(wanted, devices, policy)
    if fast is not None:
        return fast
    return _judge_all(wanted, devices, policy)


def _use_loaded_fast(wanted: tuple[str, ...], devices: Sequence[DeviceView],
                     policy: Policy) -> Decision | None:
    """Rule 3 without judging every candidate: the common case, kept cheap at scale.

    Only devices that hold a wanted model are looked at; when one of them can take the
    request it wins exactly as in `_judge_all` (same tests, same ranking), and the other
    candidates' verdicts are judged only if someone reads them (/v1/route, errors).
    """
    wanted_set = frozenset(wanted)
    margin = policy.memory_safety_margin
    loaded_states = _LOADED_STATES
    best: DeviceView | None = None
    best_key: tuple[Any, ...] | None = None
    # Written for speed (this runs per request over the whole cluster): no calls, no
    # properties, a tuple built only for a device that can take the request.
    for d in devices:
        model = d.loaded_model
        if model not in wanted_set or not d.up or d.slot_state not in loaded_states:
            continue
        cost = d.servable.get(model)
        if cost is None:
            continue
        total = d.memory_total_mb
        if total is not None and cost.memory_need_mb > total * margin:
            continue
        queue = d.in_flight + d.pending
        if queue >= d.pending_limit:
            continue
        key = (queue, -(d.memory_free_mb or 0), d.node_id, d.device_id, model)
        if best_key is None or key < best_key:
            best, best_key = d, key
    if best is None or best.loaded_model is None:
        return None
    cost = best.servable[best.loaded_model]
    winner = Verdict(best.node_id, best.device_id, best.loaded_model, Reason.MODEL_LOADED,
                     chosen=True, queue=best.queue, memory_need_mb=cost.memory_need_mb,
                     memory_total_mb=best.memory_total_mb, memory_free_mb=best.memory_free_mb)
    snapshot = list(devices)
    return Decision(Outcome.ROUTED, wanted, None, winner=winner, action=Action.USE_LOADED,
                    judge_all=lambda: _judge_all(wanted, snapshot, policy))


def _judge_all(wanted: tuple[str, ...], devices: Sequence[DeviceView],
               policy: Policy) -> Decision:
    holders: dict[str, int] = {}
    for d in devices:
        if d.up and d.holds_model and d.loaded_model is not None:
            holders[d.loaded_model] = holders.get(d.loaded_model, 0) + 1

    verdicts: list[Verdict] = []
    eligible: dict[Reason, list[Verdict]] = {r: [] for r in _RULE_OF_REASON}
    for device in devices:
        for model_id in wanted:
            cost = device.servable.get(model_id)
            if cost is None:
                continue
            verdict = _judge(device, model_id, cost, policy, holders)
            verdicts.append(verdict)
            if verdict.reason in eligible:
                eligible[verdict.reason].append(verdict)

    for reason, action in _RULE_OF_REASON.items():
        group = eligible[reason]
        if not group:
            continue
        best = min(group, key=_RANK[reason])
        winner = _with_chosen(best)
        final = tuple(winner if v is best else v for v in verdicts)
        return Decision(Outcome.ROUTED, wanted, final, winner=winner, action=action)

    return _nothing(wanted, tuple(verdicts), devices, policy)


def _judge(device: DeviceView, model_id: str, cost: ModelCost, policy: Policy,
           holders: Mapping[str, int]) -> Verdict:
    def verdict(reason: Reason, **extra: object) -> Verdict:
        return Verdict(device.node_id, device.device_id, model_id, reason, queue=device.queue,
                       memory_need_mb=cost.memory_need_mb,
                       memory_total_mb=device.memory_total_mb,
                       memory_free_mb=device.memory_free_mb, **extra)  # type: ignore[arg-type]

    if not device.up:
        return verdict(Reason.NODE_DOWN)
    if not fits_device(cost, device, policy):
        return verdict(Reason.DOES_NOT_FIT)
    if device.queue >= device.pending_limit:
        return verdict(Reason.AT_PENDING_LIMIT)
    if device.holds_model and device.loaded_model == model_id:
        return verdict(Reason.MODEL_LOADED)
    if device.slot_state in _SWITCHING_STATES:
        # Mid-switch to some model: usable once that switch and its queue are done.
        return verdict(Reason.SWITCH_AFTER_QUEUE, eviction_cost=0.0, evicts=device.loaded_model)
    if not device.holds_model:
        free = device.memory_free_mb
        if free is not None and cost.memory_need_mb > free:
            # Something outside RoleMesh holds this memory; loading would fail.
            return verdict(Reason.NOT_ENOUGH_FREE_MEMORY)
        return verdict(Reason.FITS_EMPTY_DEVICE,
                       recently_failed=device.slot_state is SlotState.FAILED)
    lose = eviction_cost(device, holders)
    if device.queue == 0:
        return verdict(Reason.EVICT_IDLE_MODEL, eviction_cost=lose, evicts=device.loaded_model)
    return verdict(Reason.SWITCH_AFTER_QUEUE, eviction_cost=lose, evicts=device.loaded_model)


def _with_chosen(v: Verdict) -> Verdict:
    return Verdict(**{**v.__dict__, "chosen": True})


def _nothing(wanted: tuple[str, ...], verdicts: tuple[Verdict, ...],
             devices: Sequence[DeviceView], policy: Policy) -> Decision:
    if not verdicts:
        return Decision(Outcome.NO_CANDIDATES, wanted, verdicts)
    reasons = {v.reason for v in verdicts}
    if reasons <= {Reason.DOES_NOT_FIT, Reason.NODE_DOWN}:
        # Down devices were not sized up: if one of them would hold the model, the model
        # does fit somewhere, and waiting for that node is the answer.
        if any(v.reason == Reason.NODE_DOWN and _fits(v.memory_need_mb, v.memory_total_mb, policy)
               for v in verdicts):
            return Decision(Outcome.ALL_DOWN, wanted, verdicts,
                            retry_after_s=policy.busy_retry_after_s)
        needs = [v.memory_need_mb for v in verdicts if v.memory_need_mb is not None]
        sizes = [d.memory_total_mb for d in devices
                 if d.memory_total_mb is not None and any(m in d.servable for m in wanted)]
        return Decision(Outcome.FITS_NOWHERE, wanted, verdicts,
                        smallest_need_mb=min(needs) if needs else None,
                        largest_device_mb=max(sizes) if sizes else None)
    return Decision(Outcome.ALL_BUSY, wanted, verdicts, retry_after_s=policy.busy_retry_after_s)
