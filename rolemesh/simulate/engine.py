"""The event loop in simulated time: arrivals, retries, timeouts, and the devices' events.

One heap of (time, sequence, callback); the sequence makes equal times run in the order
they were scheduled, so a run is a pure function of (cluster, trace, policy). A request:
resolve its name, ask the router for a device, queue there (or, at the device's pending
limit, try the next device as the dispatcher fails over, up to the router's attempts);
refused everywhere, a dispatcher that buffers (RoleMesh) holds it and tries again whenever
a device finishes a request or a load (up to `max_buffered_requests` held, each for
`buffer_timeout_s`: then `timed_out`, a 504); otherwise, or past the bound, the client
retries after Retry-After (`client.retries` times, as the openai SDK does) and then gives
up: `rejected`. A request still waiting after the
agent's queue timeout is `timed_out`. Latency counts from the first attempt.
"""

from __future__ import annotations

import functools
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from rolemesh.simulate.cluster import ClusterFile, Loads
from rolemesh.simulate.device import DeviceSim, LoadStats, Waiter
from rolemesh.simulate.routers import Refusal, Router, make_router
from rolemesh.simulate.trace import Call, Trace
from rolemesh.simulate.views import Key, World
from rolemesh.simulate.world import Work, fits, output_tokens, usable_mb, work_of


@dataclass
class Request:
    rid: int
    call: Call
    first_t: float
    session: tuple[int, int] | None = None  # (session, call index)
    tries: int = 0
    admits: int = 0  # times a device queued it (a queue timeout belongs to one of them)
    refusals: int = 0  # times an agent refused it after queueing it
    held_until: float | None = None  # held at the dispatcher until then
    key: Key | None = None
    model_id: str | None = None
    granted_t: float | None = None
    first_token_t: float | None = None
    done_t: float | None = None
    outcome: str | None = None  # ok, rejected, timed_out, fits_nowhere, not_served

    @property
    def latency_s(self) -> float | None:
        return None if self.done_t is None else self.done_t - self.first_t

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_t is None else self.first_token_t - self.first_t


@dataclass
class RunResult:
    policy: str
    trace: str
    seed: int | None
    loads: Loads
    requests: list[Request]
    devices: dict[Key, LoadStats] = field(default_factory=dict)
    end_s: float = 0.0


class Simulation:
    def __init__(self, cluster: ClusterFile, policy: str, trace: Trace, *,
                 loads: Loads | None = None, seed: int | None = None) -> None:
        if trace.one_device:
            cluster = cluster.one_device()
        self.cluster = cluster
        self.trace = trace
        self.loads: Loads = loads or cluster.loads
        self.seed = seed
        self._heap: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.world = World(cluster)
        self.requests: list[Request] = []
        self._build_devices(policy)
        self.buffered: dict[int, Request] = {}  # held at the dispatcher, oldest first
        self._buffer_wake = False
        self.buffers = getattr(self.router, "buffers", False) and \
            cluster.dispatcher.max_buffered_requests > 0

    # -- the clock devices schedule on ------------------------------------------------------------

    def at(self, t: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn))

    def run(self) -> RunResult:
        for a in self.trace.arrivals:
            self._new_request(a.t, a.call, None)
        for s_index, s in enumerate(self.trace.sessions):
            if s.calls:
                self._new_request(s.start_t, s.calls[0], (s_index, 0))
        heap = self._heap
        while heap:
            t, _, fn = heapq.heappop(heap)
            self.now = t
            fn(t)
        return RunResult(self.router.name, self.trace.name, self.seed, self.loads,
                         self.requests, {k: d.stats for k, d in self.world.devices.items()},
                         self.now)

    # -- building the world ----------------------------------------------------------------------

    def _build_devices(self, policy: str) -> None:
        cluster = self.cluster
        world = self.world
        self.router: Router = make_router(policy, world, self.trace)
        margin = cluster.dispatcher.memory_safety_margin
        models = cluster.model_by_id
        floor = self.router.preload_all  # every model resident, memory no object
        for node in cluster.nodes:
            world.nodes[node.node_id] = node
            served = cluster.serves(node)
            for spec in node.devices:
                key = (node.node_id, spec.device_id)
                device = world.devices[key] = DeviceSim(
                    key, spec.memory_mb,
                    float("inf") if floor else usable_mb(spec.memory_mb, margin), spec.speed,
                    self.router.planner(), {m: models[m].need_mb for m in served},
                    {m: models[m].parallel for m in served}, self._load_time,
                    self.router.pending_limit, self, self)
                device.margin = margin
                device.demand = functools.partial(world.recent, node.node_id)
                if floor:
                    for m in served:
                        if fits(models[m].need_mb, spec.memory_mb, margin):
                            device.preload(m, pinned=True)
        for pin in cluster.pins:
            device = world.devices[(pin.node, pin.device)]
            if not device.holds(pin.model):
                device.preload(pin.model, pinned=False)

    def _load_time(self, model_id: str) -> float:
        return self.cluster.load_seconds(self.cluster.model_by_id[model_id], self.loads)

    # -- requests ---------------------------------------------------------------------------------

    def _new_request(self, t: float, call: Call, session: tuple[int, int] | None) -> None:
        req = Request(len(self.requests), call, t, session)
        self.requests.append(req)
        self.at(t, lambda now: self._arrive(req, now))

    def _arrive(self, req: Request, now: float) -> None:
        if not self._place(req, now):
            return
        dispatcher = self.cluster.dispatcher
        if self.buffers and req.rid not in self.buffered and \
                len(self.buffered) < dispatcher.max_buffered_requests:
            self.buffered[req.rid] = req
            req.held_until = until = now + dispatcher.buffer_timeout_s
            self.at(until, lambda t: self._buffer_timeout(req, until, t))
            return
        if req.rid in self.buffered:
            return  # still held: the next device event tries it again
        if req.tries < self.cluster.client.retries:
            req.tries += 1
            self.at(now + self.cluster.dispatcher.busy_retry_after_s,
                    lambda t: self._arrive(req, t))
        else:
            self._end(req, "rejected", now)

    def _buffer_timeout(self, req: Request, until: float, now: float) -> None:
        if req.rid in self.buffered and req.held_until == until:
            del self.buffered[req.rid]
            self._end(req, "timed_out", now)

    def _wake_buffer(self, now: float) -> None:
        """A device freed a slot or finished a load: try the held requests, oldest first
        (once per instant, after the device has settled)."""
        if not self.buffered or self._buffer_wake:
            return
        self._buffer_wake = True

        def wake(t: float) -> None:
            self._buffer_wake = False
            refused: set[str] = set()  # the same name in the same state: the same answer
            for req in list(self.buffered.values()):
                if req.call.name in refused:
                    continue
                if self._place(req, t):
                    refused.add(req.call.name)
                else:
                    self.buffered.pop(req.rid, None)
        self.at(now, wake)

    def _place(self, req: Request, now: float) -> bool:
        """Route and queue `req`; True when every device refused it (busy)."""
        model_ids = [m for m in self.cluster.resolve(req.call.name)
                     if any(self.world.serves(k, m) for k in self.world.devices)]
        if not model_ids:
            self._end(req, "not_served", now)
            return False
        excluded: list[Key] = []
        refusal = Refusal("busy")
        self.world.held_ahead = sum(1 for r in self.buffered.values()
                                    if r.rid != req.rid and r.first_t <= req.first_t
                                    and r.call.name == req.call.name)
        for _ in range(self.router.max_attempts):
            route = self.router.route(self.world, model_ids, now, excluded)
            if isinstance(route, Refusal):
                refusal = route
                break
            device = self.world.devices[route.key]
            req.key = route.key
            req.admits += 1
            admit = req.admits
            if device.admit(Waiter(req.rid, route.model_id, now, self._work_fn(req, device)),
                            now):
                timeout = self.cluster.agent.queue_timeout_s
                self.at(now + timeout, functools.partial(self._timeout, req, device, admit))
                return False
            excluded.append(route.key)
        req.key = None
        if refusal.kind != "busy":
            self.buffered.pop(req.rid, None)
            self._end(req, refusal.kind, now)
            return False
        return True

    def _work_fn(self, req: Request, device: DeviceSim) -> Callable[[str], Work]:
        node_id, device_id = device.key
        spec = next(d for d in self.world.nodes[node_id].devices if d.device_id == device_id)

        def work(model_id: str) -> Work:
            model = self.cluster.model_by_id[model_id]
            prompt = req.call.prompt_tokens or model.prompt_tokens
            completion = req.call.completion_tokens or output_tokens(model.output_tokens,
                                                                     req.call.u)
            return work_of(model, spec, prompt, completion)
        return work

    def _timeout(self, req: Request, device: DeviceSim, admit: int, now: float) -> None:
        if req.admits != admit or req.outcome is not None or req.granted_t is not None:
            return
        if device.abandon(req.rid, now):
            self._end(req, "timed_out", now)

    def _end(self, req: Request, outcome: str, now: float) -> None:
        req.outcome = outcome
        if req.session is None:
            return
        s_index, c_index = req.session
        session = self.trace.sessions[s_index]
        if c_index + 1 < len(session.calls):
            self._new_request(now + session.think_s[c_index], session.calls[c_index + 1],
                              (s_index, c_index + 1))

    # -- what devices tell (device.Listener) -------------------------------------------------

    def granted(self, rid: int, key: Key, model_id: str, now: float) -> None:
        req = self.requests[rid]
        req.granted_t = now
        req.model_id = model_id
        req.key = key
        self.world.record_grant(key[0], model_id, now)
        self.world.meter(key).started(rid, model_id, now)
        self.world.last_routed.setdefault(key, now)

    def refused(self, rid: int, key: Key, now: float) -> None:
        """The device's planner refused a waiting request: a 503, which the client retries."""
        req = self.requests[rid]
        req.key = None
        req.refusals += 1
        if self.buffers and req.refusals <= 3:  # a 503: the dispatcher fails over, holds it
            self.at(now, lambda t: self._arrive(req, t))
            self._wake_buffer(now)
            return
        if req.tries < self.cluster.client.retries:
            req.tries += 1
            self.at(now + self.cluster.dispatcher.busy_retry_after_s,
                    lambda t: self._arrive(req, t))
        else:
            self._end(req, "rejected", now)

    def first_token(self, rid: int, now: float) -> None:
        self.requests[rid].first_token_t = now

    def finished(self, rid: int, key: Key, now: float) -> None:
        req = self.requests[rid]
        req.done_t = now
        self.world.request_finished(key, rid, now)
        self._end(req, "ok", now)
        self._wake_buffer(now)

    def loaded(self, key: Key, model_id: str, load_s: float) -> None:
        self.world.node_load_s[(key[0], model_id)] = load_s
        self._wake_buffer(self.now)


def simulate(cluster: ClusterFile, policy: str, trace: Trace, *, loads: Loads | None = None,
             seed: int | None = None) -> RunResult:
    return Simulation(cluster, policy, trace, loads=loads, seed=seed).run()
