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

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
    service_s: float | None = None  # seconds one request holds the device; None: policy's


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
    last_routed: float = 0.0  # when the dispatcher last sent it a request (0: never)

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
    any_holds: frozenset[str] = field(init=False, repr=False, compare=False)
    charged_mb: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Models ready or starting here on this device alone (not split over a group), the
        # same in any placement (alone or a group), and what the residents are charged here.
        alone = (self.device_id,)
        object.__setattr__(self, "single_holds", frozenset(
            r.model_id for r in self.residents if r.holds and (r.devices or alone) == alone))
        object.__setattr__(self, "any_holds", frozenset(
            r.model_id for r in self.residents if r.holds))
        object.__setattr__(self, "charged_mb", sum(r.charged_mb for r in self.residents))


@dataclass(frozen=True)
class Policy:
    memory_safety_margin: float = 0.9  # a model fits when need <= total x margin
    busy_retry_after_s: float = 1.0
    # The cost model (docs/scheduling.md): expected seconds to serve a request.
    default_service_s: float = 10.0  # a request's device time when none is measured
    load_weight: float = 4.0  # a load counts this many times its seconds (GPU time, churn)
    # An evicted model is missed if wanted within this. Short enough that the chance tells
    # a model asked for every minute from one asked for twice in ten (300 s saturated both).
    regret_horizon_s: float = 120.0
    demand_window_s: float = 600.0  # what `recent_requests` counts over
    # Another copy of a running model adds throughput for a while; the sole copies it
    # evicts must be reloaded for their own users, and those loads evict in turn. So a copy
    # pays this many times the regret a first load pays.
    copy_regret_weight: float = 2.0
    # A load on a device with nothing queued and nothing running or loading takes GPU time
    # that was free; None prices it as any other load (`load_weight`).
    idle_load_weight: float | None = None

    @cached_property  # read for every candidate's bound: worked out once per policy
    def least_load_weight(self) -> float:
        """The lowest weight any load is priced at (what a lower bound may assume)."""
        if self.idle_load_weight is None:
            return self.load_weight
        return min(self.load_weight, self.idle_load_weight)


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
    # The cost model: expected seconds until the request is served here = wait behind the
    # queue + load (weighted, when not resident) + regret (reloads what it evicts will cost).
    expected_s: float | None = None
    wait_s: float | None = None
    load_s: float | None = None
    regret_s: float | None = None
    would: Reason | None = None  # at its pending limit: what it would do once under it
    last_routed: float = 0.0


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
    # ALL_BUSY because waiting for this candidate (at its pending limit) costs less than
    # any placement that would take the request now: the dispatcher holds the request.
    waits_for: Verdict | None = None
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
            case Outcome.ALL_BUSY if self.waits_for is not None and any(
                    v.reason in _ELIGIBLE for v in self.verdicts):
                w = self.waits_for
                return (f"waiting for {w.model_id} on {w.node_id}/{w.device_id} (about "
                        f"{w.expected_s or 0:.0f}s) costs less than loading it elsewhere")
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


class _Holders(Mapping[str, int]):
    """`holders_of(devices)`, counted when first read: judging copies never reads it, and a
    bounded judgement may judge no other candidate."""

    __slots__ = ("_counts", "_devices")

    def __init__(self, devices: Sequence[DeviceView]) -> None:
        self._devices = devices
        self._counts: dict[str, int] | None = None

    def _all(self) -> dict[str, int]:
        if self._counts is None:
            self._counts = holders_of(self._devices)
        return self._counts

    def __getitem__(self, model_id: str) -> int:
        return self._all()[model_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def losing_cost(device: DeviceView, model_id: str, holders: Mapping[str, int]) -> float:
    """What losing `model_id`'s instance on `device` costs: zero if another copy runs."""
    if holders.get(model_id, 0) > 1:
        return 0.0
    cost = device.servable.get(model_id)
    load_s = cost.load_s if cost is not None else 1.0
    return device.recent_requests.get(model_id, 0) * load_s


# Every key ends with (node, placement, model): a tie never depends on input order.
_RANK: dict[Reason, Callable[[Verdict], tuple[Any, ...]]] = {
    # Copies by expected wait (a loading one counts half a load), then among equal ones
    # the least recently routed to, so a burst spreads over them.
    Reason.MODEL_LOADED: lambda v: (round(v.expected_s or 0.0, 6), v.queue, v.last_routed,
                                    -(v.memory_free_mb or 0),
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
    # A switch by what it costs in all: the wait for the busy residents, the load, and
    # the reloads of what it evicts (not by queue alone).
    Reason.SWITCH_AFTER_QUEUE: lambda v: (round(v.expected_s or 0.0, 6), v.queue,
                                          v.eviction_cost or 0.0,
                                          v.node_id, v.device_id, v.model_id),
}
_RANK[Reason.FITS_BESIDE] = _RANK[Reason.FITS_EMPTY_DEVICE]


def _room(v: Verdict) -> float:
    return float("inf") if v.memory_free_mb is None else v.memory_free_mb  # unknown last


_GROUP_OF: dict[Reason, int] = {r: i for i, group in enumerate(_GROUPS) for r in group}


def _cost_key(v: Verdict) -> tuple[Any, ...]:
    """One order over every costed candidate: expected seconds, then (on a tie) one that
    can take the request now before one at its limit, the rule groups of old, and the
    group's own ranking."""
    reason = v.would if v.reason is Reason.AT_PENDING_LIMIT and v.would else v.reason
    return (round(v.expected_s or 0.0, 6), v.reason is Reason.AT_PENDING_LIMIT,
            _GROUP_OF[reason], *_RANK[reason](v))


class ServiceTimes:
    """Seconds one request of a model holds a device, per candidate: what its node
    measured; else `measured`, the mean of what the nodes that did measure it report (a
    node that just joined, or never ran the model, is not priced at a guess while others
    know: the dispatcher's registry keeps it); else the policy's `default_service_s`."""

    __slots__ = ("_default", "measured")

    def __init__(self, measured: Mapping[str, float] | None, policy: Policy) -> None:
        self.measured: Mapping[str, float] = measured or {}
        self._default = policy.default_service_s

    def of(self, model_id: str, cost: ModelCost) -> float:
        if cost.service_s is not None:
            return cost.service_s
        return self.measured.get(model_id, self._default)


def loaded_expected(queue: int, starting: bool, cost: ModelCost, svc: float
                    ) -> tuple[float, float]:
    """(wait, load) for a request sent to a copy that is ready or loading: the queue ahead
    of it at `svc` seconds each, and half a load when the copy is still loading (it began
    some time ago)."""
    return queue * svc, (0.5 * cost.load_s if starting else 0.0)


def regret_s(device: DeviceView, evicted: Sequence[Resident], holders: Mapping[str, int],
             policy: Policy) -> float:
    """What evicting these costs later: for each, the chance it is wanted again within the
    horizon (from its recent requests, a Poisson guess; 0 when another copy runs) times a
    weighted reload."""
    total = 0.0
    for r in evicted:
        if r.leaving or holders.get(r.model_id, 0) > 1:
            continue
        cost = device.servable.get(r.model_id)
        load = cost.load_s if cost is not None else 1.0
        recent = device.recent_requests.get(r.model_id, 0)
        if r.busy:  # serving now: at least that request is demand
            recent = max(recent, 1)
        chance = 1.0 - math.exp(-recent / policy.demand_window_s * policy.regret_horizon_s)
        total += chance * policy.load_weight * load
    return total


_DEFAULT_POLICY = Policy()


def choose(model_ids: Sequence[str], devices: Sequence[DeviceView],
           policy: Policy | None = None, held_ahead: int = 0,
           measured: Mapping[str, float] | None = None) -> Decision:
    """`held_ahead`: requests for the same name the dispatcher already holds, older than
    this one; waiting for a busy copy means waiting behind them too. `measured`: each
    model's service time over the nodes that measured it, for the nodes that have not."""
    policy = policy or _DEFAULT_POLICY
    wanted = tuple(dict.fromkeys(model_ids))
    service = ServiceTimes(measured, policy)
    fast = _use_loaded_fast(wanted, devices, policy, service, held_ahead)
    if fast is not None:
        return fast
    return _judge_all(wanted, devices, policy, service, held_ahead, bounded=True)


def _use_loaded_fast(wanted: tuple[str, ...], devices: Sequence[DeviceView],  # noqa: PLR0912, PLR0915
                     policy: Policy, service: ServiceTimes, held_ahead: int = 0
                     ) -> Decision | None:
    """Rule 3 without judging every candidate: the common case, kept cheap at scale.

    Only single-device instances of a wanted model are looked at; when one of them can
    take the request it wins as in `_judge_all` (same tests, same ranking), and the other
    candidates' verdicts are judged only if someone reads them. It is final only while its
    expected wait is below a weighted load of the model (no placement that loads can beat
    it then, if the nodes load it about as fast); a longer queue is judged in full, where a
    new copy elsewhere may win.
    """
    wanted_set = frozenset(wanted)
    margin = policy.memory_safety_margin
    loaded_states = _LOADED_STATES
    best: tuple[DeviceView, ResidentView] | None = None
    best_key: tuple[Any, ...] | None = None
    waits: list[tuple[float, float]] = []  # copies at their limit: (expected, service s)
    idle_found = False
    starting = InstanceState.STARTING
    measured_s, default_svc = service.measured, policy.default_service_s
    for d in devices:
        if wanted_set.isdisjoint(d.any_holds):
            continue  # most devices: one test each
        queue = d.in_flight + d.pending
        if not d.up or d.draining or (idle_found and queue):
            continue  # an idle ready copy is found: only another idle one can tie with it
        at_limit = queue >= d.pending_limit
        for r in d.residents:
            model = r.model_id
            if model not in wanted_set or r.state not in loaded_states:
                continue
            if r.devices and r.devices != (d.device_id,):
                return None  # a copy split over a group: judged with its group, in full
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
            # loaded_expected(), inlined: this loop runs per request over every device.
            svc = cost.service_s  # service.of(), inlined
            if svc is None:
                svc = measured_s.get(model, default_svc)
            expected = queue * svc
            if r.state is starting:
                expected += 0.5 * cost.load_s
            if at_limit:  # waiting for it may beat every copy that takes it now
                waits.append((expected, svc))
                continue
            expected = round(expected, 6) if expected else 0.0
            key = (expected, queue, d.last_routed, -(room or 0), d.node_id, d.device_id, model)
            if best_key is None or key < best_key:
                best, best_key = (d, r), key
                idle_found = key[0] == 0.0
    # Waiting for a copy at its limit costs its wait plus its share of the requests held
    # ahead, priced as _judge_all prices it (to the bit: a tie must break the same way).
    best_wait = math.inf
    if waits:
        share = held_ahead / len(waits)
        best_wait = min(round(e + (round(share * svc, 6) if share else 0.0), 6)
                        for e, svc in waits)
    if best is None or best_key is None or best_wait < best_key[0]:
        return None
    d, r = best
    cost = d.servable[r.model_id]
    wait, load = loaded_expected(d.queue, r.state is InstanceState.STARTING, cost,
                                 service.of(r.model_id, cost))
    if wait + load > 0:
        # A load anywhere costs at least the quickest weighted load of a wanted model (read
        # only when the copy has a queue: an idle one is never beaten).
        quickest = min((c.load_s for x in devices for m in wanted
                        if (c := x.servable.get(m)) is not None), default=math.inf)
        if wait + load >= policy.least_load_weight * quickest:
            return None  # a load elsewhere might serve it sooner: judge every candidate
    winner = Verdict(d.node_id, d.device_id, r.model_id, Reason.MODEL_LOADED, chosen=True,
                     queue=d.queue, memory_need_mb=cost.memory_need_mb,
                     memory_total_mb=d.memory_total_mb,
                     memory_free_mb=_room_left(d, margin), expected_s=wait + load,
                     wait_s=wait, load_s=load, regret_s=0.0, last_routed=d.last_routed)
    snapshot = list(devices)
    return Decision(Outcome.ROUTED, wanted, None, winner=winner, action=Action.USE_LOADED,
                    judge_all=lambda: _judge_all(wanted, snapshot, policy, service,
                                                 held_ahead))


def _room_left(d: DeviceView, margin: float) -> int | None:
    if d.memory_total_mb is None:
        return None
    left = int(d.memory_total_mb * margin) - d.charged_mb
    if d.memory_free_mb is not None:
        left = min(left, d.memory_free_mb)
    return left


_Candidate = tuple[Sequence[DeviceView], str, ModelCost]  # placement, model, its cost


def _candidates(wanted: tuple[str, ...], devices: Sequence[DeviceView]) -> list[_Candidate]:
    """Every placement where a node serves a wanted model, in the order of `devices`."""
    by_node: dict[str, dict[str, DeviceView]] = {}
    for d in devices:
        by_node.setdefault(d.node_id, {})[d.device_id] = d
    out: list[_Candidate] = []
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
                out.append(([m for m in members if m is not None], model_id, cost))
            else:
                out.append(((device,), model_id, cost))
    return out


def _judge_all(wanted: tuple[str, ...], devices: Sequence[DeviceView],
               policy: Policy, service: ServiceTimes, held_ahead: int = 0, *,
               bounded: bool = False) -> Decision:
    """Judge the candidates and pick the one expected to serve soonest. `bounded`: judge
    only those that might win (`_judge_bounded`); the winner is the same."""
    holders = _Holders(devices)
    candidates = _candidates(wanted, devices)
    if bounded:
        pruned = _judge_bounded(wanted, candidates, devices, policy, service, holders,
                                held_ahead)
        if isinstance(pruned, Decision):
            return pruned
        verdicts = pruned
    else:
        verdicts = [_judge(group, model_id, cost, policy, holders, service)
                    for group, model_id, cost in candidates]
    return _pick(wanted, verdicts, candidates, devices, policy, service, held_ahead)


def _pick(wanted: tuple[str, ...], verdicts: list[Verdict], candidates: list[_Candidate],
          devices: Sequence[DeviceView], policy: Policy, service: ServiceTimes,
          held_ahead: int) -> Decision:
    """The decision over every candidate's verdict (in `candidates`' order)."""
    eligible: dict[Reason, list[Verdict]] = {r: [] for r in _ELIGIBLE}
    for verdict in verdicts:
        if verdict.reason in eligible:
            eligible[verdict.reason].append(verdict)
    # Every candidate is weighed by its expected seconds to serve, whatever it would do:
    # use a copy, load beside, evict idle models, switch after a queue, or (a copy at its
    # pending limit) wait while the dispatcher holds the request. On a tie: a copy before
    # a load beside before an eviction before a switch, then each rule's own ranking.
    waits = [n for n, v in enumerate(verdicts) if _is_wait(v)]
    if waits and held_ahead:
        # The requests already held wait for the same copies: a share of them each.
        share = held_ahead / len(waits)
        verdicts = list(verdicts)
        for n in waits:
            verdicts[n] = _behind_held(verdicts[n], share, candidates[n], service)
    costed = [*(verdicts[n] for n in waits), *(v for r in _ELIGIBLE for v in eligible[r])]
    if costed:
        return _decided(wanted, min(costed, key=_cost_key), verdicts, policy)
    return _nothing(wanted, tuple(verdicts), devices, policy)


def _decided(wanted: tuple[str, ...], best: Verdict, verdicts: Sequence[Verdict] | None,
             policy: Policy, judge_all: Callable[[], Decision] | None = None) -> Decision:
    """The decision for the best costed candidate: routed to it, or (a copy at its limit)
    held for it. `verdicts` None: judged by `judge_all` when read."""
    if best.reason is Reason.AT_PENDING_LIMIT:
        return Decision(Outcome.ALL_BUSY, wanted,
                        None if verdicts is None else tuple(verdicts), waits_for=best,
                        retry_after_s=policy.busy_retry_after_s, judge_all=judge_all)
    winner = _with_chosen(best)
    judged = None if verdicts is None else tuple(winner if v is best else v for v in verdicts)
    return Decision(Outcome.ROUTED, wanted, judged, winner=winner, action=_ACTION[best.reason],
                    judge_all=judge_all)


def _judge_bounded(wanted: tuple[str, ...], candidates: list[_Candidate],
                   devices: Sequence[DeviceView], policy: Policy, service: ServiceTimes,
                   holders: Mapping[str, int], held_ahead: int) -> Decision | list[Verdict]:
    """Branch and bound over the candidates: a decision judged only as far as needed, or
    (when every candidate had to be judged) the verdicts, in order, for `_pick`.

    A candidate that does not hold the model costs at least its wait plus a weighted load
    (regret is never negative), a copy at least its wait. Judged in order of that bound,
    once the best so far costs less than the next bound, neither that candidate nor any
    after it can win. The winner is the one judging all would pick (a test holds the two
    equal); the verdicts of the rest are judged in full only when read (`/v1/route`, an
    error's text), as the fast path's are.
    """
    bounds = [_lower_bound(group, model_id, cost, policy, service)
              for group, model_id, cost in candidates]
    # With requests held ahead, a wait's cost depends on how many copies share them: then
    # every copy is judged first (copies are cheap to judge), before any bound applies.
    first = [n for n, c in enumerate(candidates)
             if held_ahead and _own_instance(*c[:2]) is not None]
    firsts = set(first)
    rest = sorted((n for n in range(len(candidates)) if n not in firsts),
                  key=bounds.__getitem__)
    judged: list[Verdict | None] = [None] * len(candidates)
    for n in first:
        judged[n] = _judge(*candidates[n], policy, holders, service)
    waits = [n for n in first if _is_wait(judged[n])]  # type: ignore[arg-type]
    share = held_ahead / len(waits) if waits else 0.0
    best: Verdict | None = None
    best_key: tuple[Any, ...] | None = None

    def consider(verdict: Verdict) -> None:
        nonlocal best, best_key
        key = _cost_key(verdict)
        if best_key is None or key < best_key:
            best, best_key = verdict, key

    for n in first:
        verdict = judged[n]
        assert verdict is not None
        if _is_wait(verdict):
            consider(_behind_held(verdict, share, candidates[n], service))
        elif verdict.reason in _ELIGIBLE:
            consider(verdict)
    for n in rest:
        if best_key is not None and round(bounds[n], 6) > best_key[0]:
            break  # it, and every one after it, costs more than the best so far
        verdict = judged[n] = _judge(*candidates[n], policy, holders, service)
        if verdict.reason in _ELIGIBLE or _is_wait(verdict):
            consider(verdict)
    if all(v is not None for v in judged):
        return [v for v in judged if v is not None]
    assert best is not None  # only a known best leaves a candidate unjudged
    snapshot = list(devices)

    def judge_all() -> Decision:
        return _judge_all(wanted, snapshot, policy, service, held_ahead)

    return _decided(wanted, best, None, policy, judge_all)


def _lower_bound(group: Sequence[DeviceView], model_id: str, cost: ModelCost,
                 policy: Policy, service: ServiceTimes) -> float:
    """The least `_judge` can price this candidate at: the wait behind its queue, plus a
    weighted load unless it holds the model (computed as `_judge` does, to the bit)."""
    if len(group) == 1:  # the common case, inlined: this runs for every candidate
        device = group[0]
        wait = device.queue * service.of(model_id, cost)
        holds = model_id in device.single_holds
    else:
        wait = max(d.queue for d in group) * service.of(model_id, cost)
        holds = _own_instance(group, model_id) is not None
    return wait if holds else wait + policy.least_load_weight * cost.load_s


def _own_instance(group: Sequence[DeviceView], model_id: str) -> ResidentView | None:
    """The model's instance, ready or starting, on exactly this placement."""
    first = group[0]
    ids = tuple(d.device_id for d in group)
    return next((r for r in first.residents if r.model_id == model_id and r.holds
                 and (r.devices or (first.device_id,)) == ids), None)


def _is_wait(v: Verdict) -> bool:
    """A copy at its pending limit: waiting for it is costed (the dispatcher holds)."""
    return v.reason is Reason.AT_PENDING_LIMIT and v.would is Reason.MODEL_LOADED


def _judge(group: Sequence[DeviceView], model_id: str, cost: ModelCost, policy: Policy,
           holders: Mapping[str, int], service: ServiceTimes, *, over_limit: bool = False
           ) -> Verdict:
    first = group[0]
    ids = tuple(d.device_id for d in group)
    need = split_need(cost.memory_need_mb, ids, cost.split)
    queue = max(d.queue for d in group)
    margin = policy.memory_safety_margin
    svc = service.of(model_id, cost)
    weighted_load = policy.load_weight * cost.load_s

    def verdict(reason: Reason, **extra: Any) -> Verdict:
        return Verdict(first.node_id, placement_id(ids), model_id, reason, queue=queue,
                       memory_need_mb=need[first.device_id],
                       memory_total_mb=first.memory_total_mb,
                       memory_free_mb=_room_left(first, margin),
                       last_routed=max(d.last_routed for d in group), **extra)

    def costed(reason: Reason, wait: float, load: float, regret: float,
               **extra: Any) -> Verdict:
        return verdict(reason, expected_s=wait + load + regret, wait_s=wait, load_s=load,
                       regret_s=regret, **extra)

    mine = _own_instance(group, model_id)
    loaded = mine is not None
    excluded = _excluded(group, ids, model_id, need, cost, policy, over_limit=over_limit,
                         loaded=loaded)
    if excluded is not None:
        if excluded[0] is Reason.AT_PENDING_LIMIT and _excluded(
                group, ids, model_id, need, cost, policy, over_limit=True,
                loaded=loaded) is None:
            # What it would do once under its limit, and what waiting for that costs: the
            # decision may prefer waiting (the dispatcher holds the request) to a load.
            would = _judge(group, model_id, cost, policy, holders, service, over_limit=True)
            if would.reason is Reason.MODEL_LOADED:
                return replace(would, reason=Reason.AT_PENDING_LIMIT, would=would.reason)
        return verdict(excluded[0], **excluded[1])
    paging: str | None = None
    if cost.host_need_mb and "cpu" not in ids:
        fit = host_fit(cost.host_need_mb, first.host_available_mb, cost.allow_disk_paging)
        paging = fit.note if fit.paging else None
    if mine is not None:
        wait, load = loaded_expected(queue, mine.state is InstanceState.STARTING, cost, svc)
        return costed(Reason.MODEL_LOADED, wait, load, 0.0)

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
    regret = regret_s(first, [residents[k] for k in room.evict], holders, policy)
    if holders.get(model_id, 0):  # it runs elsewhere: this load is another copy
        regret *= policy.copy_regret_weight
    wait = queue * svc  # what runs there now: it drains first, or shares the compute
    if any(r.model_id == model_id and r.state in _LEAVING_STATES
           and (r.devices or (first.device_id,)) == ids for r in first.residents):
        return costed(Reason.SWITCH_AFTER_QUEUE, wait, weighted_load, regret,
                      eviction_cost=room.cost if evicts else None,
                      evicts=evicts, note=f"{model_id} is stopping here; a new instance "
                      "loads once it is gone")
    if room.waits_for_busy or (room.waits_for_leaving and not room.evict):
        return costed(Reason.SWITCH_AFTER_QUEUE, wait, weighted_load, regret,
                      eviction_cost=room.cost, evicts=evicts)
    # A neighbour still loading is busy too (as for eviction): it shares the device's compute.
    busy_neighbours = any(r.busy or r.state is InstanceState.STARTING
                          for d in group for r in d.residents)
    if policy.idle_load_weight is not None and queue == 0 and not busy_neighbours:
        weighted_load = policy.idle_load_weight * cost.load_s  # the GPU time it takes was free
    if room.evict:
        return costed(Reason.EVICT_IDLE_MODEL, wait, weighted_load, regret,
                      eviction_cost=room.cost, evicts=evicts,
                      recently_failed=_failed_here(group), note=paging)
    reason = Reason.FITS_BESIDE if residents else Reason.FITS_EMPTY_DEVICE
    return costed(reason, wait, weighted_load, 0.0, recently_failed=_failed_here(group),
                  busy_neighbours=busy_neighbours, note=paging)


def _excluded(group: Sequence[DeviceView], ids: tuple[str, ...], model_id: str,
              need: Mapping[str, int], cost: ModelCost, policy: Policy,
              over_limit: bool = False, loaded: bool = False
              ) -> tuple[Reason, dict[str, Any]] | None:
    """The first rule that rules a placement out, with what its verdict should say.
    `loaded`: the model runs there already (its host RAM part is taken, not needed)."""
    first = group[0]
    if not all(d.up for d in group):
        return Reason.NODE_DOWN, {}
    if any(d.draining for d in group):
        return Reason.NODE_DRAINING, {}
    if not all(_fits(need[d.device_id], d.memory_total_mb, policy) for d in group):
        return Reason.DOES_NOT_FIT, {}
    if cost.host_need_mb and "cpu" not in ids and not loaded:
        fit = host_fit(cost.host_need_mb, first.host_available_mb, cost.allow_disk_paging)
        if not fit.ok:
            return Reason.HOST_MEMORY_SHORT, {"note": fit.note}
    if not over_limit and any(d.queue >= d.pending_limit for d in group):
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


def _behind_held(v: Verdict, share: float, candidate: _Candidate,
                 service: ServiceTimes) -> Verdict:
    _, model_id, cost = candidate
    extra = round(share * service.of(model_id, cost), 6)
    return replace(v, wait_s=(v.wait_s or 0.0) + extra, expected_s=(v.expected_s or 0.0) + extra,
                   note=f"{share:g} held ahead at the dispatcher")


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
