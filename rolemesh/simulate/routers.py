"""Cluster policies: which device a request goes to, and which planner each device runs.

- `rolemesh`      the real `rolemesh.decision.choose()` on `views.device_views`, the node
                  agent's own rules on each device (`rolemesh.planner` through
                  `residency_adapter`), the dispatcher's failover; `rolemesh-slot` the same
                  with the agent's rules before model sets (`planners.TodaysAgent`).
- `round-robin`   the next device in turn that fits the model; FIFO, one model per device.
- `least-loaded`  the device with the shortest queue that fits; FIFO, one model per device.
- `ollama`        the device already holding the model, else the first with free memory,
                  else the one with the least recently used instance; models side by side
                  while memory allows, LRU eviction, 5 min keep-alive, 512 queued.
- `llama-swap`    an operator's map that knows the traffic: each name pinned to one device
                  (see `operator_map`), models on a device side by side when they fit
                  together, else swapped; one FIFO queue per device.
- `floor`         every model resident on every device it fits, no loads at all: the
                  shortest queue wins. What no placement can beat.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from rolemesh.decision import Action, Outcome, choose
from rolemesh.simulate import residency_adapter
from rolemesh.simulate.cluster import ClusterFile
from rolemesh.simulate.planners import DevicePlanner, QueuePlanner, TodaysAgent
from rolemesh.simulate.trace import Trace, mean_service_s
from rolemesh.simulate.views import Key, World, device_views
from rolemesh.simulate.world import fits

OLLAMA_QUEUE = 512  # OLLAMA_MAX_QUEUE's default
OLLAMA_KEEP_ALIVE_S = 300.0  # OLLAMA_KEEP_ALIVE's default


@dataclass(frozen=True, slots=True)
class Route:
    key: Key
    model_id: str


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: str  # busy (503, a client retries), fits_nowhere, not_served


class Router(Protocol):
    name: str
    max_attempts: int  # devices tried per request before the client gets a 503
    pending_limit: int | None  # per device: running + waiting; None: unbounded
    preload_all: bool  # every model resident everywhere before the first request

    def planner(self) -> DevicePlanner: ...

    def route(self, world: World, model_ids: Sequence[str], now: float,
              excluded: Collection[Key]) -> Route | Refusal: ...


def _fitting(world: World, model_ids: Sequence[str], excluded: Collection[Key]
             ) -> list[tuple[Key, str]]:
    """(device, model) pairs where the model alone fits the device, in cluster order."""
    margin = world.cluster.dispatcher.memory_safety_margin
    out = []
    for key, d in world.devices.items():
        if key in excluded:
            continue
        for m in model_ids:
            need = d.memory_mb.get(m)
            if need is not None and fits(need, d.memory_total_mb, margin):
                out.append((key, m))
    return out


class RoleMesh:
    preload_all = False
    buffers = True  # the dispatcher holds a request while every candidate is busy

    def __init__(self, cluster: ClusterFile, *, slot_rules: bool = False) -> None:
        self.name = "rolemesh-slot" if slot_rules else "rolemesh"
        self.max_attempts = cluster.dispatcher.max_attempts
        self.pending_limit: int | None = cluster.agent.pending_limit
        self._planner: DevicePlanner
        # The agent's own rules: the residency planner, or (rolemesh-slot) the one-model rules
        # of the agent before model sets, for comparison.
        self.co_residency = not slot_rules
        if self.co_residency:
            self._planner = residency_adapter.ResidencyPlanner(
                patience_s=cluster.agent.max_switch_wait_s,
                default_load_s=cluster.dispatcher.default_load_s)
            self.agent_rules = "rolemesh.planner"
        else:
            self._planner = TodaysAgent(cluster.agent.max_switch_wait_s)
            self.agent_rules = "node_agent/slot.py (one model per device)"
        self._policy = cluster.dispatcher.cost_model.policy(
            memory_safety_margin=cluster.dispatcher.memory_safety_margin,
            busy_retry_after_s=cluster.dispatcher.busy_retry_after_s)

    def planner(self) -> DevicePlanner:
        return self._planner

    def route(self, world: World, model_ids: Sequence[str], now: float,
              excluded: Collection[Key]) -> Route | Refusal:
        decision = choose(model_ids, device_views(world, model_ids, now, excluded,
                                                  self.co_residency), self._policy,
                          world.held_ahead, measured=world.service.means(model_ids))
        winner = decision.winner
        if winner is None:
            kind = {Outcome.FITS_NOWHERE: "fits_nowhere",
                    Outcome.NO_CANDIDATES: "not_served"}.get(decision.outcome, "busy")
            return Refusal(kind)
        key = (winner.node_id, winner.device_id)
        device = world.devices[key]
        world.last_routed[key] = now
        if decision.action is not Action.USE_LOADED:
            device.expects = winner.model_id  # Registry.expect()
        return Route(key, winner.model_id)


class RoundRobin:
    name = "round-robin"
    max_attempts = 1
    pending_limit: int | None = None
    preload_all = False

    def __init__(self) -> None:
        self._next = 0

    def planner(self) -> DevicePlanner:
        return QueuePlanner(max_resident=1)

    def route(self, world: World, model_ids: Sequence[str], now: float,
              excluded: Collection[Key]) -> Route | Refusal:
        pairs = _fitting(world, model_ids, excluded)
        if not pairs:
            return Refusal("fits_nowhere")
        key, model = pairs[self._next % len(pairs)]
        self._next += 1
        return Route(key, model)


class LeastLoaded(RoundRobin):
    name = "least-loaded"

    def route(self, world: World, model_ids: Sequence[str], now: float,
              excluded: Collection[Key]) -> Route | Refusal:
        pairs = _fitting(world, model_ids, excluded)
        if not pairs:
            return Refusal("fits_nowhere")
        key, model = min(pairs, key=lambda p: world.devices[p[0]].queue
                         / world.devices[p[0]].speed)
        return Route(key, model)


class OllamaLike:
    name = "ollama"
    max_attempts = 1
    pending_limit: int | None = OLLAMA_QUEUE
    preload_all = False

    def planner(self) -> DevicePlanner:
        return QueuePlanner(ttl_s=OLLAMA_KEEP_ALIVE_S)

    def route(self, world: World, model_ids: Sequence[str], now: float,
              excluded: Collection[Key]) -> Route | Refusal:
        pairs = _fitting(world, model_ids, excluded)
        if not pairs:
            return Refusal("fits_nowhere")
        for key, model in pairs:
            if world.devices[key].holds(model):
                return Route(key, model)
        for key, model in pairs:
            d = world.devices[key]
            if d.charged_mb + d.memory_mb[model] <= d.usable_mb:
                return Route(key, model)

        def lru(pair: tuple[Key, str]) -> float:
            d = world.devices[pair[0]]
            idle = [i.last_used for i in d.instances.values() if i.in_flight == 0
                    and not i.pinned]
            return min(idle) if idle else math.inf
        key, model = min(pairs, key=lru)  # ties: the first in cluster order
        return Route(key, model)


class OperatorMap:
    """llama-swap with a map an operator wrote knowing the traffic (see `operator_map`)."""

    name = "llama-swap"
    max_attempts = 1
    pending_limit: int | None = None
    preload_all = False

    def __init__(self, trace: Trace) -> None:
        self._trace = trace
        self.map: dict[str, Key] | None = None  # drawn once the devices exist

    def planner(self) -> DevicePlanner:
        return QueuePlanner()

    def route(self, world: World, model_ids: Sequence[str], now: float,
              excluded: Collection[Key]) -> Route | Refusal:
        if self.map is None:
            self.map = operator_map(world, self._trace)
        for m in model_ids:
            key = self.map.get(m)
            if key is not None and key not in excluded:
                return Route(key, m)
        return Refusal("fits_nowhere")


def operator_map(world: World, trace: Trace) -> dict[str, Key]:
    """Each model the trace asks for, pinned to one device: a greedy operator.

    Names go by their share of the work, heaviest first. A name's model goes where its
    device would then be least busy, counting the device's speed, and counting for a
    device where it would not fit beside the models already there the swaps it would
    cause (a load each way for every request of the smaller side). A name whose models
    are already placed uses that placement.
    """
    cluster = world.cluster
    margin = cluster.dispatcher.memory_safety_margin
    counts = Counter(trace.names())
    placed: dict[str, Key] = {}
    busy: dict[Key, float] = dict.fromkeys(world.devices, 0.0)
    requests: dict[Key, int] = dict.fromkeys(world.devices, 0)
    residents: dict[Key, list[str]] = {k: [] for k in world.devices}

    def work(name: str, model: str) -> float:
        return counts[name] * mean_service_s(cluster.model_by_id[model])

    for name in sorted(counts, key=lambda n: (-counts[n] * min(
            (mean_service_s(cluster.model_by_id[m]) for m in cluster.resolve(n)),
            default=0.0), n)):
        models = cluster.resolve(name)
        done = next((m for m in models if m in placed), None)
        if done is not None:
            key = placed[done]
            busy[key] += work(name, done) / world.devices[key].speed
            requests[key] += counts[name]
            continue
        best: tuple[float, Key, str] | None = None
        for key, d in world.devices.items():
            for m in models:
                need = d.memory_mb.get(m)
                if need is None or not fits(need, d.memory_total_mb, margin):
                    continue
                cost = busy[key] + work(name, m) / d.speed
                together = sum(d.memory_mb[r] for r in residents[key]) + need
                if together > d.usable_mb:
                    swaps = 2 * min(counts[name], requests[key])
                    cost += swaps * cluster.load_seconds(cluster.model_by_id[m])
                if best is None or cost < best[0]:
                    best = (cost, key, m)
        if best is None:
            continue
        _, key, m = best
        placed[m] = key
        residents[key].append(m)
        busy[key] = best[0]
        requests[key] += counts[name]
    return placed


class Floor:
    name = "floor"
    max_attempts = 1
    pending_limit: int | None = None
    preload_all = True

    def planner(self) -> DevicePlanner:
        return QueuePlanner()

    def route(self, world: World, model_ids: Sequence[str], now: float,
              excluded: Collection[Key]) -> Route | Refusal:
        pairs = [(k, m) for k, m in _fitting(world, model_ids, excluded)
                 if world.devices[k].holds(m)]
        if not pairs:
            return Refusal("fits_nowhere")
        key, model = min(pairs, key=lambda p: world.devices[p[0]].queue
                         / world.devices[p[0]].speed)
        return Route(key, model)


# rolemesh-slot: the decision with the one-model-per-device rules of the agent before
# model sets, to compare with.
POLICIES = ("rolemesh", "rolemesh-slot",
            "llama-swap", "floor", "ollama", "least-loaded", "round-robin")


def make_router(name: str, world: World, trace: Trace) -> Router:
    cluster = world.cluster
    match name:
        case "rolemesh":
            return RoleMesh(cluster)
        case "rolemesh-slot":
            return RoleMesh(cluster, slot_rules=True)
        case "round-robin":
            return RoundRobin()
        case "least-loaded":
            return LeastLoaded()
        case "ollama":
            return OllamaLike()
        case "llama-swap":
            return OperatorMap(trace)
        case "floor":
            return Floor()
    raise ValueError(f"unknown policy {name!r}; one of {', '.join(POLICIES)}")
