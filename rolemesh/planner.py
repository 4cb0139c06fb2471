"""A node's residency policy: `plan(view, now) -> [actions]`. Pure.

The node's owner (node_agent.scheduler) holds the instances, the waiting requests and the
operator's wishes; whenever something changes it builds a `PlanView` and executes what
`plan()` returns: grant a waiting request to an instance, start an instance, drain one (no
new requests; it stops when its last one ends), stop one with a reason, refuse a request, or
wake the owner at a time (TTLs, patience bounds and unload deadlines are all wake-ups).
No I/O, no clock reads (`now` is given), so `rolemesh simulate` runs it unchanged.

Rules, in order:
1. a draining node refuses new work and stops each instance once it is idle;
2. an unload, or a device held for a set, stops the instances concerned once idle
   (bounded by their deadline), refusing requests queued for them;
3. a ready instance takes its waiting requests, oldest first, up to `parallel` at once;
4. a request for a model with no instance on its placement starts one: at once when it
   fits beside the residents; else the cheapest set of idle, unpinned residents is stopped
   to make room (rolemesh.residency); when only busy residents could make room, they are
   drained once the request has waited its patience (never shorter than the round trip of
   the switch: its load plus the reload of each evicted model that still has demand), so a
   device does not ping-pong between two models nor starve either;
5. operator loads and preloads start like requests; pinned models are started wherever
   they fit (best device first) and move back to a better device as soon as it has room;
6. an idle instance past its TTL stops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rolemesh.api import InstanceState, StopReason
from rolemesh.residency import NoRoom, Resident, Room, RoomPlan, Target, make_room, split_need

S = InstanceState
LIVE_STATES = frozenset({S.STARTING, S.READY, S.DRAINING, S.STOPPING})
EVICTED_FOR = "evicted_for:"


def instance_key(model_id: str, devices: Sequence[str]) -> str:
    return f"{model_id}@{'+'.join(devices)}"


# -- the view ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelSpec:
    model_id: str
    need_mb: int  # over its whole placement
    load_s: float = 5.0
    parallel: int = 1
    devices: tuple[str, ...] | None = None  # a fixed placement (a device or a group)
    split: tuple[float, ...] | None = None
    pinned: bool = False
    exclusive: bool = False
    ttl_s: float | None = None
    demand: int = 0  # requests in the recent window: what losing it costs, with load_s
    # Per placement, when the node knows better than an even split of need_mb (estimated
    # for that placement by llama.cpp's rules, or measured after a load there).
    needs: Mapping[tuple[str, ...], Mapping[str, int]] = field(default_factory=dict)
    host_refused: Mapping[tuple[str, ...], str] = field(default_factory=dict)  # host RAM short

    def need_on(self, devices: Sequence[str]) -> dict[str, int]:
        known = self.needs.get(tuple(devices))
        if known is not None:
            return dict(known)
        return split_need(self.need_mb, devices, self.split)


@dataclass(frozen=True, slots=True)
class InstanceView:
    key: str
    model_id: str
    devices: tuple[str, ...]
    state: InstanceState
    charged_mb: Mapping[str, int]
    in_flight: int = 0
    parallel: int = 1
    pinned: bool = False
    exclusive: bool = False
    ttl_s: float | None = None
    idle_since: float | None = None  # when its last request ended (or it became ready)
    ready_at: float = 0.0
    draining_for: str | None = None  # "evicted_for:MODEL", or a sticky reason's value
    stop: StopReason | None = None  # an operator's unload (or drain, mode) is under way
    stop_by: float | None = None  # that stop happens by then even with requests in flight


@dataclass(frozen=True, slots=True)
class WaiterView:
    id: int
    model_id: str
    devices: tuple[str, ...]
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class WantView:
    """An instance someone wants loaded without a request: an operator's load, a preload."""

    id: int
    model_id: str
    devices: tuple[str, ...] | None  # None: wherever it fits best


@dataclass(frozen=True, slots=True)
class PlanView:
    rooms: Mapping[str, Room]
    device_order: tuple[str, ...]  # best first: where a pinned or preloaded model goes
    models: Mapping[str, ModelSpec]
    instances: tuple[InstanceView, ...] = ()
    waiters: tuple[WaiterView, ...] = ()
    wants: tuple[WantView, ...] = ()
    sets: Mapping[str, frozenset[str]] = field(default_factory=dict)
    held: Mapping[str, frozenset[str]] = field(default_factory=dict)  # device -> its set
    failed_until: Mapping[str, float] = field(default_factory=dict)  # instance key -> t
    draining: bool = False
    co_residency: bool = True
    patience_s: float = 30.0
    optimize: bool = False  # `rolemesh optimize`: pinned models may evict idle ones to move


# -- the actions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    waiter: int
    instance: str


@dataclass(frozen=True, slots=True)
class Start:
    model_id: str
    devices: tuple[str, ...]
    why: str  # request, load, preload, pinned, mode, moved
    want: int | None = None


@dataclass(frozen=True, slots=True)
class Drain:
    instance: str
    why: str


@dataclass(frozen=True, slots=True)
class Undrain:
    instance: str


@dataclass(frozen=True, slots=True)
class Stop:
    instance: str
    reason: StopReason
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    waiter: int
    message: str
    want: bool = False  # the id is a want's, not a waiter's


@dataclass(frozen=True, slots=True)
class WakeAt:
    at: float


Action = Grant | Start | Drain | Undrain | Stop | Reject | WakeAt


# -- the policy ----------------------------------------------------------------------------


class _Work:
    """The plan's scratch state: instances as they will be once the actions so far ran."""

    def __init__(self, view: PlanView, now: float) -> None:
        self.view = view
        self.now = now
        self.out: list[Action] = []
        self.wakes: list[float] = []
        self.live: dict[str, InstanceView] = {
            i.key: i for i in view.instances if i.state in LIVE_STATES}
        self.leaving: set[str] = {k for k, i in self.live.items()
                                  if i.state is S.STOPPING or i.stop is not None}
        self.in_flight: dict[str, int] = {k: i.in_flight for k, i in self.live.items()}
        self.queued: dict[str, int] = {}
        for w in view.waiters:
            k = instance_key(w.model_id, w.devices)
            self.queued[k] = self.queued.get(k, 0) + 1
        self.drained: set[str] = {k for k, i in self.live.items()
                                  if i.draining_for is not None and i.stop is None}
        self.wanted_gone: set[str] = set()
        self.stopped: set[str] = set()
        self.starting: dict[str, int] = {}  # instance key -> MB charged (started this plan)

    def wake(self, at: float) -> None:
        if at > self.now:
            self.wakes.append(at)

    def stop(self, key: str, reason: StopReason, detail: str | None = None) -> None:
        if key in self.stopped or (key in self.live and self.live[key].state is S.STOPPING):
            return
        self.out.append(Stop(key, reason, detail))
        self.stopped.add(key)
        self.leaving.add(key)

    def lose_cost(self, inst: InstanceView) -> float:
        spec = self.view.models.get(inst.model_id)
        if spec is None:
            return 0.0
        copies = sum(1 for k, i in self.live.items()
                     if i.model_id == inst.model_id and k not in self.leaving)
        return 0.0 if copies > 1 else spec.demand * spec.load_s

    def residents(self) -> list[Resident]:
        out = []
        for k, i in self.live.items():
            busy = (self.in_flight.get(k, 0) > 0 or self.queued.get(k, 0) > 0
                    or i.state is S.STARTING)
            out.append(Resident(k, i.model_id, i.charged_mb, busy=busy, pinned=i.pinned,
                                exclusive=i.exclusive, cost=self.lose_cost(i),
                                leaving=k in self.leaving))
        for k, _ in self.starting.items():
            model_id = k.split("@", 1)[0]
            spec = self.view.models[model_id]
            devices = tuple(k.split("@", 1)[1].split("+"))
            out.append(Resident(k, model_id, spec.need_on(devices), busy=True,
                                pinned=spec.pinned, exclusive=spec.exclusive))
        return out

    def room_for(self, model_id: str, devices: tuple[str, ...]) -> RoomPlan | NoRoom:
        spec = self.view.models[model_id]
        refused = spec.host_refused.get(devices)
        if refused is not None:
            return NoRoom(refused)
        target = Target(model_id, spec.need_on(devices),
                        exclusive=spec.exclusive or not self.view.co_residency)
        if not self.view.co_residency:
            target = Target(model_id, target.need_mb, exclusive=True)
        return make_room(target, self.view.rooms, self.residents(), self.view.sets,
                         self.view.held)

    def has_instance(self, key: str) -> bool:
        inst = self.live.get(key)
        return key in self.starting or (
            inst is not None and inst.state in (S.STARTING, S.READY)
            and key not in self.leaving)

    def start(self, model_id: str, devices: tuple[str, ...], why: str,
              want: int | None = None) -> None:
        key = instance_key(model_id, devices)
        self.out.append(Start(model_id, devices, why, want))
        self.starting[key] = 1


def plan(view: PlanView, now: float) -> list[Action]:
    work = _Work(view, now)
    if view.draining:
        _drain_node(work)
    else:
        _sticky_stops(work)
        _grant(work)
        _serve_waiters(work)
        _undrain_unwanted(work)
        _serve_wants(work)
        _pinned(work)
        _ttl(work)
    if work.wakes:
        work.out.append(WakeAt(min(work.wakes)))
    return work.out


def _drain_node(work: _Work) -> None:
    for w in work.view.waiters:
        work.out.append(Reject(w.id, "this node is draining"))
    for want in work.view.wants:
        work.out.append(Reject(want.id, "this node is draining", want=True))
    for k, inst in work.live.items():
        if inst.state is S.STOPPING:
            continue
        if work.in_flight.get(k, 0) == 0 or (inst.stop_by is not None
                                             and work.now >= inst.stop_by):
            work.stop(k, StopReason.DRAIN)
        else:
            if inst.draining_for != StopReason.DRAIN.value:
                work.out.append(Drain(k, StopReason.DRAIN.value))
            if inst.stop_by is not None:
                work.wake(inst.stop_by)


def _sticky_stops(work: _Work) -> None:
    """Operator stops (unload) and instances off a held device's set."""
    held = work.view.held
    for k, inst in list(work.live.items()):
        reason = inst.stop
        if reason is None and any(d in held and inst.model_id not in held[d]
                                  for d in inst.devices):
            reason = StopReason.MODE
        if reason is None or inst.state is S.STOPPING:
            continue
        work.leaving.add(k)
        for w in work.view.waiters:
            if instance_key(w.model_id, w.devices) == k:
                work.out.append(Reject(w.id, f"{inst.model_id} on {'+'.join(inst.devices)} "
                                       f"is being stopped ({reason.value})"))
        work.queued[k] = 0
        deadline_passed = inst.stop_by is not None and work.now >= inst.stop_by
        if work.in_flight.get(k, 0) == 0 or deadline_passed:
            work.stop(k, reason)
        else:
            if inst.draining_for != reason.value:
                work.out.append(Drain(k, reason.value))
            if inst.stop_by is not None:
                work.wake(inst.stop_by)


def _grant(work: _Work) -> None:
    rejected = {a.waiter for a in work.out if isinstance(a, Reject) and not a.want}
    for w in work.view.waiters:
        if w.id in rejected:
            continue
        k = instance_key(w.model_id, w.devices)
        inst = work.live.get(k)
        if (inst is None or inst.state is not S.READY or k in work.drained
                or k in work.leaving):
            continue
        if work.in_flight[k] >= inst.parallel:
            continue
        work.in_flight[k] += 1
        work.queued[k] -= 1
        work.out.append(Grant(w.id, k))


def _serve_waiters(work: _Work) -> None:
    handled = {a.waiter for a in work.out if isinstance(a, Grant | Reject)}
    groups: dict[str, list[WaiterView]] = {}
    for w in work.view.waiters:
        if w.id not in handled:
            groups.setdefault(instance_key(w.model_id, w.devices), []).append(w)
    for k, group in groups.items():
        first = group[0]
        if work.has_instance(k) or k in work.drained:
            continue  # loading, full, or draining: it will take them when it can
        inst = work.live.get(k)
        if inst is not None and inst.state is S.STOPPING:
            continue  # a start follows once it is gone
        if first.model_id not in work.view.models:
            for w in group:
                work.out.append(Reject(w.id, f"{first.model_id} is not served here"))
            continue
        until = work.view.failed_until.get(k)
        if until is not None and work.now < until:
            for w in group:
                work.out.append(Reject(w.id, f"{first.model_id} failed to load on "
                                       f"{'+'.join(first.devices)}; next try in "
                                       f"{until - work.now:.1f}s"))
            continue
        _make_room_and_start(work, first.model_id, first.devices, "request",
                             waited_since=min(w.enqueued_at for w in group),
                             reject=[w.id for w in group])


def _make_room_and_start(work: _Work, model_id: str, devices: tuple[str, ...], why: str, *,
                         waited_since: float | None, reject: Sequence[int] = (),
                         want: int | None = None) -> bool:
    """Start `model_id` on `devices` now, or do what makes room for it. True if started."""
    room = work.room_for(model_id, devices)
    if isinstance(room, NoRoom):
        for wid in reject:
            work.out.append(Reject(wid, room.why))
        if want is not None:
            work.out.append(Reject(want, room.why, want=True))
        return False
    if room.immediate:
        work.start(model_id, devices, why, want)
        return True
    if room.waits_for_busy and waited_since is not None:
        busy = [work.live[k] for k in room.evict if k in work.live]
        held_since = max([waited_since, *(i.ready_at for i in busy)])
        due_at = held_since + max(work.view.patience_s,
                                  switch_round_trip_s(work.view, model_id, busy))
        if work.now < due_at:
            work.wake(due_at)
            return False
    for k in room.evict:
        work.wanted_gone.add(k)
        if k in work.starting or work.live[k].state is S.STARTING:
            continue  # drained or stopped once it is ready
        if work.in_flight.get(k, 0) == 0:
            work.stop(k, StopReason.EVICTED_FOR, model_id)
        elif k not in work.drained:
            work.out.append(Drain(k, EVICTED_FOR + model_id))
            work.drained.add(k)
    return False


def switch_round_trip_s(view: PlanView, model_id: str,
                        evicted: Sequence[InstanceView]) -> float:
    """What a switch costs the device: load the waiting model, then, for each model it
    evicts that still has demand, load that one back. A patience shorter than this would
    make a switch cost more than the wait it saves (a one-GPU box would thrash)."""
    load = view.models[model_id].load_s
    for inst in evicted:
        spec = view.models.get(inst.model_id)
        if spec is not None and spec.demand > 0:
            load += spec.load_s
    return load


def _undrain_unwanted(work: _Work) -> None:
    for k in sorted(work.drained - work.wanted_gone):
        inst = work.live[k]
        if inst.draining_for is None or not inst.draining_for.startswith(EVICTED_FOR):
            continue
        if k in work.leaving:
            continue  # drained, then stopped: it keeps its reason but can take nothing now
        if any(isinstance(a, Drain) and a.instance == k for a in work.out):
            continue
        work.out.append(Undrain(k))
        work.drained.discard(k)
        handled = {a.waiter for a in work.out if isinstance(a, Grant | Reject) and
                   not (isinstance(a, Reject) and a.want)}
        for w in work.view.waiters:
            if instance_key(w.model_id, w.devices) != k or w.id in handled:
                continue
            if work.in_flight[k] >= inst.parallel:
                break
            work.in_flight[k] += 1
            work.queued[k] -= 1
            work.out.append(Grant(w.id, k))


def _placements(work: _Work, spec: ModelSpec) -> list[tuple[str, ...]]:
    if spec.devices is not None:
        return [spec.devices]
    return [(d,) for d in work.view.device_order]


def _best_placement(work: _Work, spec: ModelSpec, *, allow_evict: bool
                    ) -> tuple[tuple[str, ...], RoomPlan] | None:
    """Where a model without a request should go: the first device, best first, that takes
    it now; else (allow_evict) the one whose idle evictions cost least."""
    options: list[tuple[tuple[float, int], tuple[str, ...], RoomPlan]] = []
    for rank, devices in enumerate(_placements(work, spec)):
        if instance_key(spec.model_id, devices) in work.live:
            continue  # its instance there is on its way out: one instance per placement
        room = work.room_for(spec.model_id, devices)
        if isinstance(room, NoRoom) or room.waits_for_busy:
            continue
        if room.immediate:
            return devices, room
        if allow_evict and not room.waits_for_leaving:
            options.append(((room.cost, rank), devices, room))
    if not options:
        return None
    _, devices, room = min(options, key=lambda o: o[0])
    return devices, room


def _serve_wants(work: _Work) -> None:
    for want in work.view.wants:
        spec = work.view.models.get(want.model_id)
        if spec is None:
            work.out.append(Reject(want.id, f"{want.model_id} is not served here", want=True))
            continue
        if want.devices is not None:
            k = instance_key(want.model_id, want.devices)
            if work.has_instance(k):
                continue
            if k in work.live:
                continue  # draining or stopping: a new one once it is gone (one per key)
            _make_room_and_start(work, want.model_id, want.devices, "load",
                                 waited_since=None, want=want.id)
            continue
        if any(work.has_instance(instance_key(want.model_id, p))
               for p in _placements(work, spec)):
            continue
        best = _best_placement(work, spec, allow_evict=True)
        if best is None:
            work.out.append(Reject(want.id, f"no device has room for {want.model_id} "
                                   "without stopping a busy or pinned model", want=True))
            continue
        devices, room = best
        if room.immediate:
            work.start(want.model_id, devices, "load", want.id)
        else:
            for k in room.evict:
                work.wanted_gone.add(k)
                work.stop(k, StopReason.EVICTED_FOR, want.model_id)


def _pinned(work: _Work) -> None:
    for spec in work.view.models.values():
        if not spec.pinned:
            continue
        placements = _placements(work, spec)
        held = [p for p in placements if work.has_instance(instance_key(spec.model_id, p))]
        if not held:
            _start_pinned(work, spec, placements)
        elif spec.devices is None:
            _move_pinned(work, spec, placements, held)


def _start_pinned(work: _Work, spec: ModelSpec, placements: list[tuple[str, ...]]) -> None:
    failed = [work.view.failed_until.get(instance_key(spec.model_id, p), 0.0)
              for p in placements]
    if all(f > work.now for f in failed):
        work.wake(min(failed))
        return
    best = _best_placement(work, spec, allow_evict=True)
    if best is None:
        return
    devices, room = best
    if room.immediate:
        work.start(spec.model_id, devices, "pinned")
        return
    for k in room.evict:
        work.wanted_gone.add(k)
        work.stop(k, StopReason.EVICTED_FOR, spec.model_id)


def _move_pinned(work: _Work, spec: ModelSpec, placements: list[tuple[str, ...]],
                 held: list[tuple[str, ...]]) -> None:
    """Back to a better device: start there when it has room, then stop the worse copy."""
    ranks = {p: r for r, p in enumerate(placements)}
    if len(held) > 1:
        ready = [p for p in held
                 if (inst := work.live.get(instance_key(spec.model_id, p))) is not None
                 and inst.state is S.READY]
        if not ready:
            return
        best_ready = min(ready, key=lambda p: ranks[p])
        for p in held:
            k = instance_key(spec.model_id, p)
            if (ranks[p] > ranks[best_ready] and work.in_flight.get(k, 0) == 0
                    and work.queued.get(k, 0) == 0):
                work.stop(k, StopReason.MOVED, "+".join(best_ready))
        return
    current = min(held, key=lambda p: ranks[p])
    for p in placements[:ranks[current]]:
        if instance_key(spec.model_id, p) in work.live:
            continue  # a copy there is still on its way out
        room = work.room_for(spec.model_id, p)
        if isinstance(room, NoRoom) or room.waits_for_busy:
            continue
        if room.immediate:
            work.start(spec.model_id, p, "moved")
            return
        if work.view.optimize and not room.waits_for_leaving:
            for k in room.evict:
                work.wanted_gone.add(k)
                work.stop(k, StopReason.EVICTED_FOR, spec.model_id)
            return


def _ttl(work: _Work) -> None:
    for k, inst in work.live.items():
        if (inst.state is not S.READY or inst.pinned or inst.ttl_s is None
                or k in work.leaving or inst.idle_since is None
                or work.in_flight.get(k, 0) or work.queued.get(k, 0)):
            continue
        due = inst.idle_since + inst.ttl_s
        if work.now >= due:
            work.stop(k, StopReason.TTL)
        else:
            work.wake(due)
