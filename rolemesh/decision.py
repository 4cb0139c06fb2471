"""Which device serves a request: a pure function of data.

No I/O, no logging, no clock. The dispatcher calls it over the whole cluster, the node
agent over its own devices (for requests sent to it directly); both render the returned
`Decision` (the winner plus a verdict per candidate) for `/v1/route`, errors and logs.

A device holds a set of model instances. A candidate is a (placement, model) pair: the
placement is one device, or the device group a model is split over. The rules, in order
(see docs/scheduling.md for why):
1. candidates: every placement where the node serves one of the models;
2. drop placements that are down or draining, at their pending limit, too small for the
   model, held for a set without it, where the model failed to load recently, or where
   only pinned models could make room;
3. a placement that already has the model (ready or starting) wins, least queue first;
4. else one where the model fits beside what is resident: a device without busy
   neighbours first, then the best fit (least room left over, so big rooms stay free for
   the models only they can hold), then least queue;
5. else stop, on that placement, the cheapest set of idle unpinned instances that makes
   room (recent requests x load time; free when a copy runs elsewhere);
6. else queue behind busy instances and switch when they drain (the agent bounds that
   wait), least queue first; a busy model is never evicted under its users;
7. else nothing, with a reason the client can act on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from rolemesh.api import InstanceState
from rolemesh.memory_breakdown import host_fit
from rolemesh.residency import NoRoom, Resident, Room, Target, make_room, split_need


class Reason(StrEnum):
    NODE_DOWN = "node_down"
    NODE_DRAINING = "node_draining"
    AT_PENDING_LIMIT = "at_pending_limit"
    DOES_NOT_FIT = "does_not_fit"
    RECENTLY_FAILED = "recently_failed"  # its load failed here; backing off
    HELD_FOR_SET = "held_for_set"  # the operator holds the device for another set
    NO_ROOM = "no_room"  # only pinned (or exclusive-pinned) models could make room
    NOT_ENOUGH_FREE_MEMORY = "not_enough_free_memory"  # held by something outside RoleMesh
    HOST_MEMORY_SHORT = "host_memory_short"  # its host-RAM part does not fit the node
    MODEL_LOADED = "model_loaded"
    FITS_EMPTY_DEVICE = "fits_empty_device"
    FITS_BESIDE = "fits_beside"  # room beside the resident instances
    EVICT_IDLE_MODEL = "evict_idle_model"
    SWITCH_AFTER_QUEUE = "switch_after_queue"


class Action(StrEnum):
    USE_LOADED = "use_loaded"
    LOAD_ON_EMPTY = "load_on_empty"
    LOAD_BESIDE = "load_beside"
    EVICT = "evict"
    SWITCH_AFTER_QUEUE = "switch_after_queue"


class Outcome(StrEnum):
    ROUTED = "routed"
    ALL_BUSY = "all_busy"
    FITS_NOWHERE = "fits_nowhere"
    ALL_DOWN = "all_down"
    NO_CANDIDATES = "no_candidates"


# Eligible reasons, in the order their groups are tried.
_GROUPS: tuple[tuple[Reason, ...], ...] = (
    (Reason.MODEL_LOADED,),
    (Reason.FITS_EMPTY_DEVICE, Reason.FITS_BESIDE),
    (Reason.EVICT_IDLE_MODEL,),
    (Reason.SWITCH_AFTER_QUEUE,),
)
_ACTION: dict[Reason, Action] = {
    Reason.MODEL_LOADED: Action.USE_LOADED,
    Reason.FITS_EMPTY_DEVICE: Action.LOAD_ON_EMPTY,
    Reason.FITS_BESIDE: Action.LOAD_BESIDE,
    Reason.EVICT_IDLE_MODEL: Action.EVICT,
    Reason.SWITCH_AFTER_QUEUE: Action.SWITCH_AFTER_QUEUE,
}
_ELIGIBLE = frozenset(_ACTION)

_LOADED_STATES = frozenset({InstanceState.READY, InstanceState.STARTING})
_LEAVING_STATES = frozenset({InstanceState.DRAINING, InstanceState.STOPPING})


@dataclass(frozen=True, slots=True)
class ModelCost:
    """What a model costs on one node: memory to hold it, seconds to load it, and the
    operator's constraints on where it runs."""

    memory_need_mb: int
    load_s: float = 1.0
    devices: tuple[str, ...] | None = None  # a fixed placement (a device or a group)
    split: tuple[float, ...] | None = None  # the group's tensor split
    pinned: bool = False
    exclusive: bool = False
    host_need_mb: int = 0  # what stays in host RAM on a GPU placement
    allow_disk_paging: bool = False


@dataclass(frozen=True, slots=True)
class ResidentView:
    """A model instance on a device, as the decision sees it."""

    model_id: str
    state: InstanceState = InstanceState.READY
    busy: int = 0  # requests in flight or queued for it
    charged_mb: int = 0  # on this device
    pinned: bool = False
    exclusive: bool = False
    devices: tuple[str, ...] = ()  # its placement when it spans several devices

    @property
    def holds(self) -> bool:
        return self.state in _LOADED_STATES


@dataclass(frozen=True)
class DeviceView:
    """Everything the decision needs to know about one device."""

    node_id: str
    device_id: str
    servable: Mapping[str, ModelCost]  # model id -> cost, for the models its node serves
    memory_total_mb: int | None = None
    memory_free_mb: int | None = None  # what the backend reports free; None: not reported
    residents: tuple[ResidentView, ...] = ()
    in_flight: int = 0
    pending: int = 0
    pending_limit: int = 2
    up: bool = True
    recent_requests: Mapping[str, int] = field(default_factory=dict)
    held: frozenset[str] | None = None  # the operator holds this device for a set
    sets: Mapping[str, frozenset[str]] = field(default_factory=dict)  # its node's sets
    failed: Mapping[str, float] = field(default_factory=dict)  # model -> backoff left (s)
    draining: bool = False  # its node is draining
    co_residency: bool = True  # False: one model at a time (the node's config)
    host_available_mb: int | None = None  # its node's host RAM available now

    @property
    def key(self) -> tuple[str, str]:
        return (self.node_id, self.device_id)

    @property
    def queue(self) -> int:
        return self.in_flight + self.pending

    @property
    def loaded_models(self) -> tuple[str, ...]:
        return tuple(r.model_id for r in self.residents if r.holds)

    # Derived once, at construction (views are immutable, and read on every request).
    single_holds: frozenset[str] = field(init=False, repr=False, compare=False)
    charged_mb: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Models ready or starting here on this device alone (not split over a group), and
        # what the residents are charged here.
        object.__setattr__(self, "single_holds", frozenset(
            r.model_id for r in self.residents if r.holds and not r.devices))
        object.__setattr__(self, "charged_mb", sum(r.charged_mb for r in self.residents))


@dataclass(frozen=True)
class Policy:
    memory_safety_margin: float = 0.9  # a model fits when need <= total x margin
    busy_retry_after_s: float = 1.0


@dataclass(frozen=True)
class Verdict:
    node_id: str
    device_id: str  # a device, or a group as "gpu:0+gpu:1"
    model_id: str
    reason: Reason
    chosen: bool = False
    queue: int = 0
    memory_need_mb: int | None = None  # on the placement's first device (its share)
    memory_total_mb: int | None = None
    memory_free_mb: int | None = None  # room left for it: total x margin - charged
    eviction_cost: float | None = None  # what losing the evicted instances costs
    evicts: tuple[str, ...] = ()  # model ids it would stop to make room
    recently_failed: bool = False  # a failed start here, backing off (or about to retry)
    busy_neighbours: bool = False  # instances on it are serving: it would share compute
    note: str | None = None  # why it is excluded, when a reason alone does not say


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
        """A verdict for every candidate (placement, model), the winner's marked `chosen`."""
        if self.judged is not None:
            return self.judged
        assert self.judge_all is not None
        return self.judge_all().verdicts

    def explain(self) -> str:
        if self.winner is not None and self.action is not None:
            w = self.winner
            evicts = f", stopping {', '.join(w.evicts)}" if w.evicts else ""
            return (f"{w.model_id} on {w.node_id}/{w.device_id}: {self.action.value} "
                    f"({w.reason.value}{evicts})")
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


def placement_id(devices: Sequence[str]) -> str:
    return "+".join(devices)


def fits_device(cost: ModelCost, device: DeviceView, policy: Policy) -> bool:
    return _fits(cost.memory_need_mb, device.memory_total_mb, policy)


def _fits(need_mb: int | None, total_mb: int | None, policy: Policy) -> bool:
    if need_mb is None or total_mb is None:
        return True  # unknown size: the load itself will tell
    return need_mb <= total_mb * policy.memory_safety_margin


def holders_of(devices: Sequence[DeviceView]) -> dict[str, int]:
    """How many up placements hold each model (a group's instance counts once)."""
    seen: set[tuple[str, str, str]] = set()
    holders: dict[str, int] = {}
    for d in devices:
        if not d.up:
            continue
        for r in d.residents:
            if not r.holds:
                continue
            where = (d.node_id, placement_id(r.devices) if r.devices else d.device_id,
                     r.model_id)
            if where not in seen:
                seen.add(where)
                holders[r.model_id] = holders.get(r.model_id, 0) + 1
    return holders


def losing_cost(device: DeviceView, model_id: str, holders: Mapping[str, int]) -> float:
    """What losing `model_id`'s instance on `device` costs: zero if another copy runs."""
    if holders.get(model_id, 0) > 1:
        return 0.0
    cost = device.servable.get(model_id)
    load_s = cost.load_s if cost is not None else 1.0
    return device.recent_requests.get(model_id, 0) * load_s


# Every key ends with (node, placement, model): a tie never depends on input order.
_RANK: dict[Reason, Callable[[Verdict], tuple[Any, ...]]] = {
    Reason.MODEL_LOADED: lambda v: (v.queue, -(v.memory_free_mb or 0),
                                    v.node_id, v.device_id, v.model_id),
    # A failed placement is empty too, but whatever broke it may break the next load as
    # well; then a device with no busy neighbour (they would share its compute); then the
    # best fit, so a big device stays free for what only it can hold.
    # Best fit is judged on the device (the tightest room that takes the model), and among
    # a role's models on one device the smaller goes first: it leaves more for others.
    Reason.FITS_EMPTY_DEVICE: lambda v: (v.recently_failed, v.busy_neighbours,
                                         _room(v), v.memory_need_mb or 0, v.queue,
                                         v.node_id, v.device_id, v.model_id),
    Reason.EVICT_IDLE_MODEL: lambda v: (v.eviction_cost or 0.0, v.recently_failed,
                                        _room(v), v.memory_need_mb or 0,
                                        v.node_id, v.device_id, v.model_id),
    Reason.SWITCH_AFTER_QUEUE: lambda v: (v.queue, v.eviction_cost or 0.0,
                                          v.node_id, v.device_id, v.model_id),
}
_RANK[Reason.FITS_BESIDE] = _RANK[Reason.FITS_EMPTY_DEVICE]


def _room(v: Verdict) -> float:
    return float("inf") if v.memory_free_mb is None else v.memory_free_mb  # unknown last


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

    Only single-device instances of a wanted model are looked at; when one of them can
    take the request it wins exactly as in `_judge_all` (same tests, same ranking), and the
    other candidates' verdicts are judged only if someone reads them.
    """
    wanted_set = frozenset(wanted)
    margin = policy.memory_safety_margin
    loaded_states = _LOADED_STATES
    best: tuple[DeviceView, ResidentView] | None = None
    best_key: tuple[Any, ...] | None = None
    best_queue = None
    for d in devices:
        if wanted_set.isdisjoint(d.single_holds):
            continue
        queue = d.in_flight + d.pending
        if queue >= d.pending_limit or not d.up or d.draining or (
                best_queue is not None and queue > best_queue):
            continue
        for r in d.residents:
            model = r.model_id
            if model not in wanted_set or r.state not in loaded_states or r.devices:
                continue
            cost = d.servable.get(model)
            if cost is None or model in d.failed:
                continue
            total = d.memory_total_mb
            if total is not None and cost.memory_need_mb > total * margin:
                continue
            if d.held is not None and model not in d.held:
                continue
            free = d.memory_free_mb
            room = None if total is None else int(total * margin) - d.charged_mb
            if room is not None and free is not None and free < room:
                room = free
            key = (queue, -(room or 0), d.node_id, d.device_id, model)
            if best_key is None or key < best_key:
                best, best_key, best_queue = (d, r), key, queue
    if best is None:
        return None
    d, r = best
    cost = d.servable[r.model_id]
    winner = Verdict(d.node_id, d.device_id, r.model_id, Reason.MODEL_LOADED, chosen=True,
                     queue=d.queue, memory_need_mb=cost.memory_need_mb,
                     memory_total_mb=d.memory_total_mb,
                     memory_free_mb=_room_left(d, margin))
    snapshot = list(devices)
    return Decision(Outcome.ROUTED, wanted, None, winner=winner, action=Action.USE_LOADED,
                    judge_all=lambda: _judge_all(wanted, snapshot, policy))


def _room_left(d: DeviceView, margin: float) -> int | None:
    if d.memory_total_mb is None:
        return None
    left = int(d.memory_total_mb * margin) - d.charged_mb
    if d.memory_free_mb is not None:
        left = min(left, d.memory_free_mb)
    return left


def _judge_all(wanted: tuple[str, ...], devices: Sequence[DeviceView],
               policy: Policy) -> Decision:
    holders = holders_of(devices)
    by_node: dict[str, dict[str, DeviceView]] = {}
    for d in devices:
        by_node.setdefault(d.node_id, {})[d.device_id] = d

    verdicts: list[Verdict] = []
    eligible: dict[Reason, list[Verdict]] = {r: [] for r in _ELIGIBLE}
    for device in devices:
        for model_id in wanted:
            cost = device.servable.get(model_id)
            if cost is None:
                continue
            if cost.devices is not None:
                if device.device_id != cost.devices[0]:
                    continue  # a fixed placement is judged once, at its first device
                members = [by_node[device.node_id].get(m) for m in cost.devices]
                if any(m is None for m in members):
                    continue  # a device of the group is not reported: not placeable
                group = [m for m in members if m is not None]
            else:
                group = [device]
            verdict = _judge(group, model_id, cost, policy, holders)
            verdicts.append(verdict)
            if verdict.reason in eligible:
                eligible[verdict.reason].append(verdict)

    for reasons in _GROUPS:
        group_verdicts = [v for r in reasons for v in eligible[r]]
        if not group_verdicts:
            continue
        best = min(group_verdicts, key=_RANK[group_verdicts[0].reason])
        winner = _with_chosen(best)
        final = tuple(winner if v is best else v for v in verdicts)
        return Decision(Outcome.ROUTED, wanted, final, winner=winner,
                        action=_ACTION[best.reason])

    return _nothing(wanted, tuple(verdicts), devices, policy)


def _judge(group: Sequence[DeviceView], model_id: str, cost: ModelCost, policy: Policy,
           holders: Mapping[str, int]) -> Verdict:
    first = group[0]
    ids = tuple(d.device_id for d in group)
    need = split_need(cost.memory_need_mb, ids, cost.split)
    queue = max(d.queue for d in group)
    margin = policy.memory_safety_margin

    def verdict(reason: Reason, **extra: Any) -> Verdict:
        return Verdict(first.node_id, placement_id(ids), model_id, reason, queue=queue,
                       memory_need_mb=need[first.device_id],
                       memory_total_mb=first.memory_total_mb,
                       memory_free_mb=_room_left(first, margin), **extra)

    excluded = _excluded(group, ids, model_id, need, cost, policy)
    if excluded is not None:
        return verdict(excluded[0], **excluded[1])
    paging: str | None = None
    if cost.host_need_mb and "cpu" not in ids:
        fit = host_fit(cost.host_need_mb, first.host_available_mb, cost.allow_disk_paging)
        paging = fit.note if fit.paging else None
    if any(r.model_id == model_id and r.holds and (r.devices or (first.device_id,)) == ids
           for r in first.residents):
        return verdict(Reason.MODEL_LOADED)

    rooms = {d.device_id: Room(d.memory_total_mb, margin, d.memory_free_mb) for d in group}
    residents = _residents(group, holders)
    target = Target(model_id, need, exclusive=cost.exclusive or not first.co_residency)
    held = {d.device_id: d.held for d in group if d.held is not None}
    room = make_room(target, rooms, residents.values(), first.sets, held)
    if isinstance(room, NoRoom):
        return verdict(_no_room_reason(model_id, held, bool(residents)), note=room.why)
    # Its own instance here is on its way out: a placement holds one instance per model, so
    # a new one can only load after that one is gone (the agent waits for it).
    evicts = tuple(sorted({residents[k].model_id for k in room.evict}))
    if any(r.model_id == model_id and r.state in _LEAVING_STATES
           and (r.devices or (first.device_id,)) == ids for r in first.residents):
        return verdict(Reason.SWITCH_AFTER_QUEUE, eviction_cost=room.cost if evicts else None,
                       evicts=evicts, note=f"{model_id} is stopping here; a new instance "
                       "loads once it is gone")
    if room.waits_for_busy or (room.waits_for_leaving and not room.evict):
        return verdict(Reason.SWITCH_AFTER_QUEUE, eviction_cost=room.cost, evicts=evicts)
    if room.evict:
        return verdict(Reason.EVICT_IDLE_MODEL, eviction_cost=room.cost, evicts=evicts,
                       recently_failed=_failed_here(group), note=paging)
    # A neighbour still loading is busy too (as for eviction): it shares the device's compute.
    busy_neighbours = any(r.busy or r.state is InstanceState.STARTING
                          for d in group for r in d.residents)
    reason = Reason.FITS_BESIDE if residents else Reason.FITS_EMPTY_DEVICE
    return verdict(reason, recently_failed=_failed_here(group),
                   busy_neighbours=busy_neighbours, note=paging)


def _excluded(group: Sequence[DeviceView], ids: tuple[str, ...], model_id: str,
              need: Mapping[str, int], cost: ModelCost, policy: Policy
              ) -> tuple[Reason, dict[str, Any]] | None:
    """The first rule that rules a placement out, with what its verdict should say."""
    first = group[0]
    if not all(d.up for d in group):
        return Reason.NODE_DOWN, {}
    if any(d.draining for d in group):
        return Reason.NODE_DRAINING, {}
    if not all(_fits(need[d.device_id], d.memory_total_mb, policy) for d in group):
        return Reason.DOES_NOT_FIT, {}
    if cost.host_need_mb and "cpu" not in ids:
        fit = host_fit(cost.host_need_mb, first.host_available_mb, cost.allow_disk_paging)
        if not fit.ok:
            return Reason.HOST_MEMORY_SHORT, {"note": fit.note}
    if any(d.queue >= d.pending_limit for d in group):
        return Reason.AT_PENDING_LIMIT, {}
    if model_id in first.failed:
        return Reason.RECENTLY_FAILED, {"recently_failed": True,
                                        "note": f"backing off for {first.failed[model_id]:.1f}s"}
    # Held for a set without the model: even a loaded instance is being stopped (mode), and
    # the agent refuses requests for it (as the fast path already assumes).
    if any(d.held is not None and model_id not in d.held for d in group):
        return Reason.HELD_FOR_SET, {"note": f"{placement_id(ids)} is held for a set "
                                             f"without {model_id}"}
    return None


def _no_room_reason(model_id: str, held: Mapping[str, frozenset[str]], occupied: bool
                    ) -> Reason:
    if any(model_id not in h for h in held.values()):
        return Reason.HELD_FOR_SET
    # Nothing of ours to stop, yet no room: something outside RoleMesh holds the memory.
    return Reason.NO_ROOM if occupied else Reason.NOT_ENOUGH_FREE_MEMORY


def _failed_here(group: Sequence[DeviceView]) -> bool:
    return any(r.state is InstanceState.FAILED for d in group for r in d.residents) or any(
        d.failed for d in group)


def _residents(group: Sequence[DeviceView], holders: Mapping[str, int]) -> dict[str, Resident]:
    """The instances on a placement's devices, a group's instance once with its shares."""
    out: dict[str, Resident] = {}
    charged: dict[str, dict[str, int]] = {}
    for d in group:
        for r in d.residents:
            if r.state is InstanceState.FAILED or r.state is InstanceState.EMPTY:
                continue
            key = f"{r.model_id}@{placement_id(r.devices or (d.device_id,))}"
            charged.setdefault(key, {})[d.device_id] = r.charged_mb
            if key not in out:
                out[key] = Resident(key, r.model_id, {}, busy=r.busy > 0 or
                                    r.state is InstanceState.STARTING, pinned=r.pinned,
                                    exclusive=r.exclusive,
                                    cost=losing_cost(d, r.model_id, holders),
                                    leaving=r.state in _LEAVING_STATES)
    return {k: Resident(v.key, v.model_id, charged[k], busy=v.busy, pinned=v.pinned,
                        exclusive=v.exclusive, cost=v.cost, leaving=v.leaving)
            for k, v in out.items()}


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
