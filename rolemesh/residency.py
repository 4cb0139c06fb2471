"""What must leave a device (or a device group) for one more model to run there: pure.

Shared by the dispatcher's decision (which judges every candidate device) and the node's
planner (which executes), so both reason about room the same way. No I/O, no clock.

A target needs some MB on each device of its placement. A device's budget is
total x margin minus what its residents are charged, never more than what the backend
reports free (plus what the evicted residents hold, which they give back). Operator
constraints come first: an exclusive model runs alone, a held set keeps other models off,
and with declared sets a device only ever holds a subset of one set. Then memory: the
cheapest set of unpinned residents whose removal makes room, where a resident costs what
losing it costs (recent demand x load time; 0 when a copy runs elsewhere). An idle set is
always preferred to one that needs busy residents to drain first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

EXACT_SEARCH_LIMIT = 10  # residents; above it the cheapest cover is found greedily


@dataclass(frozen=True, slots=True)
class Resident:
    key: str  # unique per node: the instance (model id and placement)
    model_id: str
    charged_mb: Mapping[str, int]  # device -> MB charged there
    busy: bool = False  # requests in flight or queued for it
    pinned: bool = False
    exclusive: bool = False
    cost: float = 0.0  # what losing it costs
    leaving: bool = False  # already stopping or draining away: its room comes back by itself


@dataclass(frozen=True, slots=True)
class Room:
    """A device's memory as the budget sees it."""

    total_mb: int | None  # None: unknown, the load itself will tell
    margin: float = 0.9
    free_mb: int | None = None  # what the backend reports free now; None: not reported

    @property
    def usable_mb(self) -> float | None:
        return None if self.total_mb is None else self.total_mb * self.margin


@dataclass(frozen=True, slots=True)
class Target:
    model_id: str
    need_mb: Mapping[str, int]  # device -> MB it needs there
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class RoomPlan:
    evict: tuple[str, ...]  # resident keys, sorted; `leaving` ones are not listed
    cost: float  # what losing them costs
    waits_for_busy: bool  # some of them are busy: they must drain first
    waits_for_leaving: bool  # room that residents already on their way out give back
    set_name: str | None = None  # with declared sets: the one the device(s) will hold

    @property
    def immediate(self) -> bool:
        """The target can start now: nothing to evict, nothing to wait for."""
        return not self.evict and not self.waits_for_leaving


@dataclass(frozen=True, slots=True)
class NoRoom:
    why: str  # for verdicts and errors


def split_need(total_mb: int, devices: Sequence[str],
               split: Sequence[float] | None = None) -> dict[str, int]:
    """A model's need charged to each device of its placement, by its tensor split."""
    if len(devices) == 1:
        return {devices[0]: total_mb}
    weights = list(split) if split and len(split) == len(devices) else [1.0] * len(devices)
    whole = sum(weights) or 1.0
    return {d: math.ceil(total_mb * w / whole) for d, w in zip(devices, weights, strict=True)}


def set_options(model_id: str, sets: Mapping[str, frozenset[str]]
                ) -> list[tuple[str | None, frozenset[str] | None]]:
    """The sets the target may share a device in: all that name it (a model in none runs
    alone); without declared sets, memory alone decides (None)."""
    if not sets:
        return [(None, None)]
    named: list[tuple[str | None, frozenset[str] | None]] = [
        (name, members) for name, members in sorted(sets.items()) if model_id in members]
    return named or [(None, frozenset({model_id}))]


def make_room(target: Target, rooms: Mapping[str, Room], residents: Iterable[Resident],
              sets: Mapping[str, frozenset[str]] | None = None,
              held: Mapping[str, frozenset[str]] | None = None) -> RoomPlan | NoRoom:
    devices = list(target.need_mb)
    # Sorted, so float sums and ties never depend on the order residents were listed in.
    on = sorted((r for r in residents if any(d in r.charged_mb for d in devices)),
                key=lambda r: r.key)
    for d in devices:
        hold = (held or {}).get(d)
        if hold is not None and target.model_id not in hold:
            return NoRoom(f"{d} is held for a set without {target.model_id}")
        usable = rooms[d].usable_mb if d in rooms else None
        if usable is not None and target.need_mb[d] > usable:
            return NoRoom(f"{target.model_id} needs {target.need_mb[d]} MB on {d}; "
                          f"{int(usable)} MB usable")
    best: RoomPlan | None = None
    why = "only pinned models could make room"
    for set_name, members in set_options(target.model_id, sets or {}):
        must = [r for r in on if _must_leave(target, r, members)]
        if any(r.pinned and not r.leaving for r in must):
            why = (f"pinned {', '.join(sorted(r.model_id for r in must if r.pinned))} "
                   f"cannot share a device with {target.model_id}")
            continue
        plan = _cover_memory(target, rooms, on, must, set_name)
        if plan is not None and (best is None or _plan_key(plan) < _plan_key(best)):
            best = plan
    return best if best is not None else NoRoom(why)


def _must_leave(target: Target, r: Resident, members: frozenset[str] | None) -> bool:
    if target.exclusive or r.exclusive:
        return True
    return members is not None and r.model_id not in members


def _plan_key(plan: RoomPlan) -> tuple[bool, float, bool, int, tuple[str, ...]]:
    return (plan.waits_for_busy, plan.cost, plan.waits_for_leaving, len(plan.evict), plan.evict)


def _cover_memory(target: Target, rooms: Mapping[str, Room], on: Sequence[Resident],
                  must: Sequence[Resident], set_name: str | None) -> RoomPlan | None:
    gone = {r.key for r in must} | {r.key for r in on if r.leaving}
    if not _deficits(target, rooms, on, gone):
        return _plan(target, rooms, on, must, set_name)
    optional = [r for r in on if r.key not in gone and not r.pinned]
    for allow_busy in (False, True):
        pool = [r for r in optional if allow_busy or not r.busy]
        chosen = _cheapest_cover(target, rooms, on, gone, pool)
        if chosen is not None:
            return _plan(target, rooms, on, [*must, *chosen], set_name)
    return None


def _plan(target: Target, rooms: Mapping[str, Room], on: Sequence[Resident],
          picked: Sequence[Resident], set_name: str | None) -> RoomPlan:
    staying = [r for r in picked if not r.leaving]
    # Residents already on their way out hold room until they are gone: does the target
    # need it now (or must one of them leave for a constraint)?
    waits = (any(r.leaving for r in picked)
             or bool(_deficits(target, rooms, on, {r.key for r in staying})))
    return RoomPlan(evict=tuple(sorted(r.key for r in staying)),
                    cost=sum(r.cost for r in staying),
                    waits_for_busy=any(r.busy for r in staying),
                    waits_for_leaving=waits, set_name=set_name)


def _deficits(target: Target, rooms: Mapping[str, Room], on: Sequence[Resident],
              gone: set[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d, need in target.need_mb.items():
        room = rooms.get(d)
        if room is None or room.total_mb is None:
            continue
        kept = sum(r.charged_mb.get(d, 0) for r in on if r.key not in gone)
        freed = sum(r.charged_mb.get(d, 0) for r in on if r.key in gone)
        budget = room.total_mb * room.margin - kept
        if room.free_mb is not None:
            budget = min(budget, room.free_mb + freed)
        if need > budget:
            out[d] = need - budget
    return out


def _cheapest_cover(target: Target, rooms: Mapping[str, Room], on: Sequence[Resident],
                    gone: set[str], pool: Sequence[Resident]) -> list[Resident] | None:
    if _deficits(target, rooms, on, gone | {r.key for r in pool}):
        return None  # even evicting all of them is not enough
    if len(pool) <= EXACT_SEARCH_LIMIT:
        best: tuple[tuple[float, int, tuple[str, ...]], list[Resident]] | None = None
        for size in range(1, len(pool) + 1):
            for combo in combinations(pool, size):
                keys = {r.key for r in combo}
                if _deficits(target, rooms, on, gone | keys):
                    continue
                key = (sum(r.cost for r in combo), size, tuple(sorted(keys)))
                if best is None or key < best[0]:
                    best = (key, list(combo))
        return best[1] if best is not None else None
    # Greedy: cheapest per MB freed first, then drop whatever turned out unneeded.
    order = sorted(pool, key=lambda r: (r.cost / max(1, sum(r.charged_mb.values())), r.key))
    chosen: list[Resident] = []
    for r in order:
        chosen.append(r)
        if not _deficits(target, rooms, on, gone | {c.key for c in chosen}):
            break
    for r in sorted(chosen, key=lambda r: (-r.cost, r.key)):
        rest = [c for c in chosen if c.key != r.key]
        if not _deficits(target, rooms, on, gone | {c.key for c in rest}):
            chosen = rest
    return chosen
