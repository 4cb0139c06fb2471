"""The node's owner of residency: admission, the memory budget, the waiters, the lifecycle.

`NodeScheduler` is the only owner of this node's model instances, of the requests waiting
for them and of the operator's wishes (loads, unloads, drain, a device held for a set). It
never decides inline: every change (a request queued, finished or gone, an instance ready,
failed or stopped, a timer, an admin verb) re-plans with the pure `rolemesh.planner.plan`
and executes the actions it returns. Wake-ups (TTLs, patience, unload deadlines, backoffs)
are one `loop.call_at` timer, never a polling loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from node_agent.config import ModelConfig, NodeAgentConfig
from node_agent.instance import ModelInstance
from node_agent.launcher import Launcher
from rolemesh.api import InstanceState, StopReason
from rolemesh.errors import DeviceBusy, ModelNotReady, NodeDraining, QueueTimeout
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
from rolemesh.residency import Room, split_need
from rolemesh.service_time import ServiceMeter

log = structlog.get_logger("node_agent.scheduler")
S = InstanceState

RECENT_WINDOW_S = 600.0
DEFAULT_LOAD_S = 5.0  # what a load is assumed to cost before one was measured
MAX_BACKOFF_S = 300.0
CRASH_LOOP_S = 30.0  # a crash sooner than this after becoming ready counts toward a loop
STOP_HISTORY = 50


NeedOf = Callable[[ModelConfig, tuple[str, ...]], tuple[dict[str, int], str | None]]


@dataclass(eq=False)
class _Waiter:
    id: int
    model: ModelConfig
    devices: tuple[str, ...]
    enqueued_at: float
    future: asyncio.Future[ModelInstance] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(eq=False)
class _Want:
    id: int
    model: ModelConfig
    devices: tuple[str, ...] | None
    why: str
    future: asyncio.Future[ModelInstance] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    key: str | None = None  # the instance started for it


@dataclass(frozen=True)
class StopEntry:
    model_id: str
    devices: tuple[str, ...]
    reason: StopReason
    detail: str | None
    at: float


@dataclass(frozen=True)
class Budget:
    total_mb: int | None
    free_mb: int | None  # as the backend reports it


class NodeScheduler:
    def __init__(self, config: NodeAgentConfig, device_ids: Sequence[str],
                 budgets: Callable[[], Mapping[str, Budget]], needs_mb: Mapping[str, int],
                 launcher: Launcher, *, queue_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 need_of: NeedOf | None = None) -> None:
        self.config = config
        self.device_ids = tuple(device_ids)  # best first: GPUs, then the CPU
        self._budgets = budgets
        self.needs_mb = dict(needs_mb)
        # Per placement: (MB per device, why host RAM refuses it or None); None: needs_mb
        # split evenly (by tensor_split) is all there is.
        self._need_of = need_of
        self.on_ready: Callable[[ModelInstance], None] | None = None
        # Awaited before each launch: the node waits there for memory an earlier stop frees.
        self.before_start: Callable[[ModelInstance], Awaitable[None]] | None = None
        self._launcher = launcher
        self._queue_timeout_s = queue_timeout_s
        self._clock = clock
        self.instances: dict[str, ModelInstance] = {}
        self._waiters: list[_Waiter] = []
        self._wants: list[_Want] = []
        self._ids = itertools.count(1)
        self._failures: dict[str, int] = {}  # failed starts in a row, per instance key
        self._crashes: dict[str, int] = {}  # crashes soon after becoming ready, in a row
        self._failed_until: dict[str, float] = {}
        self._failed_error: dict[str, str] = {}
        self._restarts: dict[str, int] = {}
        self.load_seconds: dict[str, float] = {}
        self._served: dict[str, deque[float]] = {}
        # Each device's share of time per request, by model (ModelStatus.service_s).
        self.meters = {d: ServiceMeter() for d in self.device_ids}
        self.stops: deque[StopEntry] = deque(maxlen=STOP_HISTORY)
        self.held: dict[str, str] = {}  # device -> the set name it is held for
        self.draining = False
        self._optimize = False
        self._closing = False
        self._planning = False
        self._again = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.starts = 0  # processes started, for operators and tests
        self.listeners: list[Callable[[str, dict[str, object]], None]] = []

    # -- reading -----------------------------------------------------------------------------

    def instances_on(self, device_id: str) -> list[ModelInstance]:
        return [i for i in self.instances.values() if device_id in i.devices]

    def queue_of(self, device_id: str) -> tuple[int, int]:
        """(in flight, waiting) on a device, over all its instances."""
        in_flight = sum(i.in_flight for i in self.instances_on(device_id))
        waiting = sum(1 for w in self._waiters if device_id in w.devices)
        return in_flight, waiting

    def queued_for(self, key: str) -> int:
        return sum(1 for w in self._waiters if instance_key(w.model.model_id, w.devices) == key)

    def recent_requests(self, model_id: str) -> int:
        served = self._served.get(model_id)
        if not served:
            return 0
        horizon = self._clock() - RECENT_WINDOW_S
        while served and served[0] < horizon:
            served.popleft()
        return len(served)

    def failed_models(self, device_id: str) -> dict[str, float]:
        now = self._clock()
        out = {}
        for key, until in self._failed_until.items():
            model_id, placement = key.split("@", 1)
            if until > now and device_id in placement.split("+"):
                out[model_id] = round(until - now, 3)
        return out

    def failed_on(self, device_id: str) -> list[tuple[str, tuple[str, ...], int, str, float]]:
        """Placements on this device whose model failed and has no live instance there:
        (model, devices, failures or restarts so far, the error, backoff left in s)."""
        now = self._clock()
        out = []
        for key, error in self._failed_error.items():
            model_id, placement = key.split("@", 1)
            devices = tuple(placement.split("+"))
            if device_id not in devices or key in self.instances:
                continue
            count = max(self._failures.get(key, 0), self._restarts.get(key, 0))
            left = max(0.0, self._failed_until.get(key, now) - now)
            out.append((model_id, devices, count, error, round(left, 3)))
        return out

    def failure_of(self, device_id: str) -> str | None:
        for key, error in self._failed_error.items():
            if device_id in key.split("@", 1)[1].split("+"):
                return error
        return None

    def charged_on(self, device_id: str) -> int:
        return sum(i.charged_mb.get(device_id, 0) for i in self.instances_on(device_id))

    def ttl_left(self, inst: ModelInstance) -> float | None:
        ttl = self.config.ttl_of(inst.model)
        if ttl is None or inst.idle_since is None or inst.state is not S.READY:
            return None
        return max(0.0, inst.idle_since + ttl - self._clock())

    # -- asking for an outcome ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, model: ModelConfig, devices: tuple[str, ...]
                    ) -> AsyncIterator[ModelInstance]:
        """Wait for a place to run a request for `model` on `devices`; yields the instance.

        Raises DeviceBusy at once when in-flight + waiting would pass a device's pending
        limit, QueueTimeout when it waited its whole queue timeout, ModelNotReady when the
        model could not be made ready there. Leaving the block frees the place on every path.
        """
        waiter = self._admit(model, devices)
        if not waiter.future.done():  # most requests are granted at once: skip the wait
            try:
                done, _ = await asyncio.wait({waiter.future}, timeout=self._queue_timeout_s)
            except asyncio.CancelledError:
                self._abandon(waiter)
                raise
            if not done:
                self._abandon(waiter)
                raise QueueTimeout(f"waited {self._queue_timeout_s:g}s in the queue of "
                                   f"{'+'.join(devices)} for {model.model_id} without a turn")
        inst = waiter.future.result()  # raises the refusal, if any
        self._served.setdefault(model.model_id, deque()).append(self._clock())
        meters = [self.meters[d] for d in devices if d in self.meters]
        for meter in meters:
            meter.started(waiter.id, model.model_id, self._clock())
        try:
            yield inst
        finally:
            for meter in meters:
                meter.finished(waiter.id, self._clock())
            inst.release()
            self._replan()

    def waiting(self, model: ModelConfig, devices: tuple[str, ...]) -> bool:
        """Would a request for `model` on `devices` wait for a load (not just a turn)?"""
        inst = self.instances.get(instance_key(model.model_id, devices))
        return inst is None or inst.state is not S.READY

    def _admit(self, model: ModelConfig, devices: tuple[str, ...]) -> _Waiter:
        if self._closing:
            raise ModelNotReady("this node agent is shutting down")
        if self.draining:
            raise NodeDraining(f"node {self.config.node_id!r} is draining: no new requests")
        limit = self.config.max_pending_requests_per_device
        for d in devices:
            in_flight, waiting = self.queue_of(d)
            if in_flight + waiting >= limit:
                raise DeviceBusy(f"{d} has {in_flight} in flight and {waiting} waiting "
                                 f"(limit {limit}); retry shortly")
        waiter = _Waiter(next(self._ids), model, devices, self._clock())
        self._waiters.append(waiter)
        self._replan()
        return waiter

    def _abandon(self, waiter: _Waiter) -> None:
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            fut.result().release()  # granted just as its client went away
        else:
            fut.cancel()
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        self._replan()

    async def load(self, model: ModelConfig, devices: tuple[str, ...] | None = None,
                   why: str = "load") -> ModelInstance:
        """Load `model` (on `devices`, or where it fits best) and wait until it is ready."""
        if self.draining:
            raise NodeDraining(f"node {self.config.node_id!r} is draining")
        # Already ready there: nothing to wait for (the plan starts nothing, so no "ready"
        # would ever come to complete the wait).
        for inst in self.instances.values():
            if (inst.model_id == model.model_id and inst.state is S.READY
                    and inst.stop_reason is None and (devices is None or inst.devices == devices)):
                return inst
        want = _Want(next(self._ids), model, devices, why)
        self._wants.append(want)
        self._replan()
        try:
            return await want.future
        finally:
            if want in self._wants:
                self._wants.remove(want)

    async def unload(self, model_id: str, devices: tuple[str, ...] | None = None,
                     reason: StopReason = StopReason.UNLOAD) -> list[str]:
        """Stop `model_id`'s instances (all, or the one on `devices`) once their requests end
        (bounded by unload_timeout_s); returns the keys stopped."""
        chosen = [i for i in self.instances.values() if i.model_id == model_id
                  and (devices is None or i.devices == devices)
                  and i.state in (S.STARTING, S.READY, S.DRAINING)]
        deadline = self._clock() + self.config.unload_timeout_s
        for inst in chosen:
            inst.stop_reason = reason
            inst.stop_by = deadline
        self._replan()
        await asyncio.gather(*(i.wait_ended() for i in chosen))
        return [i.key for i in chosen]

    def drain(self) -> None:
        self.draining = True
        deadline = self._clock() + self.config.unload_timeout_s
        for inst in self.instances.values():
            inst.stop_by = deadline
        self._emit("node.draining", {})
        self._replan()

    def undrain(self) -> None:
        self.draining = False
        for inst in self.instances.values():
            inst.stop_by = None
        self._emit("node.undrained", {})
        self._replan()

    def hold(self, device_id: str, set_name: str | None) -> None:
        """Hold a device for a named set (load it, keep others off), or release it (None)."""
        if set_name is None:
            self.held.pop(device_id, None)
        else:
            self.held[device_id] = set_name
            for model_id in self.config.sets[set_name]:
                model = self.config.model(model_id)
                if model is not None and model.placement in (None, (device_id,)):
                    want = _Want(next(self._ids), model, (device_id,), "mode")
                    self._wants.append(want)
                    want.future.add_done_callback(self._forget_want(want))
        self._emit("device.mode", {"device": device_id, "set": set_name})
        self._replan()

    def optimize(self) -> None:
        """Let pinned models evict idle ones to move back to their best device, now."""
        self._optimize = True
        try:
            self._replan()
        finally:
            self._optimize = False

    def start(self) -> None:
        """Load what is pinned (the plan does) and what is preloaded."""
        for model in self.config.models:
            if model.preload and not model.pinned:
                want = _Want(next(self._ids), model, model.placement, "preload")
                self._wants.append(want)
                want.future.add_done_callback(self._forget_want(want))
        self._replan()

    def _forget_want(self, want: _Want) -> Callable[[asyncio.Future[ModelInstance]], None]:
        def forget(fut: asyncio.Future[ModelInstance]) -> None:
            if want in self._wants:
                self._wants.remove(want)
            if not fut.cancelled():
                fut.exception()  # retrieved: a failed preload is logged, not raised
        return forget

    async def shutdown(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(ModelNotReady("this node agent is shutting down"))
        self._waiters.clear()
        for want in self._wants:
            if not want.future.done():
                want.future.set_exception(ModelNotReady("this node agent is shutting down"))
        live = list(self.instances.values())
        for inst in live:
            inst.stop(StopReason.SHUTDOWN)
        await asyncio.gather(*(i.wait_ended() for i in live))

    # -- planning ----------------------------------------------------------------------------

    def _view(self, now: float) -> PlanView:
        budgets = self._budgets()
        margin = self.config.memory_safety_margin
        rooms = {d: Room(b.total_mb, margin, b.free_mb) for d, b in budgets.items()}
        models = {m.model_id: ModelSpec(
            m.model_id, self.needs_mb[m.model_id],
            load_s=self.load_seconds.get(m.model_id, DEFAULT_LOAD_S), parallel=m.parallel,
            devices=m.placement, split=m.split, pinned=m.pinned, exclusive=m.exclusive,
            ttl_s=self.config.ttl_of(m), demand=self.recent_requests(m.model_id),
            **self._placement_needs(m))
            for m in self.config.models}
        instances = tuple(InstanceView(
            i.key, i.model_id, i.devices, i.state, i.charged_mb, in_flight=i.in_flight,
            parallel=i.model.parallel, pinned=i.model.pinned, exclusive=i.model.exclusive,
            ttl_s=self.config.ttl_of(i.model), idle_since=i.idle_since, ready_at=i.ready_at,
            draining_for=i.draining_for,
            stop=(StopReason.DRAIN if self.draining else i.stop_reason),
            stop_by=i.stop_by) for i in self.instances.values() if i.state is not S.EMPTY)
        waiters = tuple(WaiterView(w.id, w.model.model_id, w.devices, w.enqueued_at)
                        for w in self._waiters)
        wants = tuple(WantView(w.id, w.model.model_id, w.devices) for w in self._wants
                      if not w.future.done())
        sets = {name: frozenset(ms) for name, ms in self.config.sets.items()}
        held = {d: sets[name] for d, name in self.held.items()}
        return PlanView(rooms=rooms, device_order=self.device_ids, models=models,
                        instances=instances, waiters=waiters, wants=wants, sets=sets,
                        held=held, failed_until=dict(self._failed_until),
                        draining=self.draining, co_residency=self.config.co_residency,
                        patience_s=self.config.max_switch_wait_s, optimize=self._optimize)

    def _placement_needs(self, m: ModelConfig) -> dict[str, Any]:
        if self._need_of is None:
            return {}
        placements = [m.placement] if m.placement else [(d,) for d in self.device_ids]
        needs: dict[tuple[str, ...], dict[str, int]] = {}
        refused: dict[tuple[str, ...], str] = {}
        for p in placements:
            per_device, refusal = self._need_of(m, p)
            needs[p] = per_device
            if refusal is not None:
                refused[p] = refusal
        return {"needs": needs, "host_refused": refused}

    def _replan(self) -> None:
        if self._closing:
            return
        if self._planning:
            self._again = True  # an action changed something: plan once more after
            return
        self._planning = True
        try:
            for _ in range(20):
                self._again = False
                self._waiters = [w for w in self._waiters if not w.future.done()]
                now = self._clock()
                self._execute(plan(self._view(now), now), now)
                if not self._again:
                    break
        finally:
            self._planning = False

    def _execute(self, actions: Sequence[object], now: float) -> None:
        waiters = {w.id: w for w in self._waiters}
        wants = {w.id: w for w in self._wants}
        wake: float | None = None
        for action in actions:
            match action:
                case Grant(waiter=wid, instance=key):
                    w = waiters.pop(wid)
                    inst = self.instances[key]
                    inst.acquire()
                    self._waiters.remove(w)
                    w.future.set_result(inst)
                case Start(model_id=model_id, devices=devices, why=why, want=want_id):
                    self._start(model_id, devices, why)
                    if want_id is not None and want_id in wants:
                        wants[want_id].key = instance_key(model_id, devices)
                case Drain(instance=key, why=why):
                    self.instances[key].drain(why)
                case Undrain(instance=key):
                    self.instances[key].undrain()
                case Stop(instance=key, reason=reason, detail=detail):
                    self.instances[key].stop(reason, detail)
                case Reject(waiter=wid, message=message, want=True):
                    want = wants.pop(wid, None)
                    if want is not None and not want.future.done():
                        want.future.set_exception(ModelNotReady(message))
                case Reject(waiter=wid, message=message):
                    w = waiters.pop(wid)
                    self._waiters.remove(w)
                    # A refusal after a failed load says why it failed (exit code, output).
                    key = instance_key(w.model.model_id, w.devices)
                    if key in self._failed_until and key in self._failed_error:
                        message = f"{message}: {self._failed_error[key]}"
                    w.future.set_exception(ModelNotReady(message))
                case WakeAt(at=at):
                    wake = at
        self._arm(wake, now)

    def _arm(self, at: float | None, now: float) -> None:
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, at - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._replan()

    def _start(self, model_id: str, devices: tuple[str, ...], why: str) -> None:
        model = self.config.model(model_id)
        assert model is not None
        key = instance_key(model_id, devices)
        need = self.needs_mb[model_id]
        charged = (self._need_of(model, devices)[0] if self._need_of is not None
                   else split_need(need, devices, model.split))
        inst = ModelInstance(model, devices, charged, before_start=self.before_start,
                             launcher=self._launcher, clock=self._clock,
                             on_change=self._on_change,
                             stop_grace_s=self.config.llama_server_stop_grace_s,
                             restarts=self._restarts.get(key, 0), estimated_mb=need)
        self.instances[key] = inst
        self.starts += 1
        log.info("instance.loading", model=model_id, devices=list(devices), why=why,
                 charged_mb=inst.charged_mb)
        self._emit("instance.loading", {"model": model_id, "devices": list(devices),
                                        "why": why})
        inst.begin()

    # -- hearing from instances --------------------------------------------------------------

    def _on_change(self, inst: ModelInstance) -> None:
        now = self._clock()
        if inst.state is S.READY and inst.history[-2] is S.STARTING:
            self.load_seconds[inst.model_id] = inst.last_load_s or 0.0
            self._failures.pop(inst.key, None)  # failed starts; quick crashes count on
            self._failed_until.pop(inst.key, None)
            self._failed_error.pop(inst.key, None)
            self._emit("instance.ready", {"model": inst.model_id, "devices": list(inst.devices),
                                          "load_s": inst.last_load_s,
                                          "restart": inst.restarts > 0})
            if self.on_ready is not None:
                self.on_ready(inst)  # measures what it really took
            for want in list(self._wants):
                if not want.future.done() and want.model.model_id == inst.model_id and (
                        want.key == inst.key or want.devices == inst.devices
                        or (want.devices is None and want.key is None)):
                    want.future.set_result(inst)
        if inst.state is S.FAILED:
            self._failed(inst, now)
        if inst.state in (S.EMPTY, S.FAILED) and self.instances.get(inst.key) is inst:
            del self.instances[inst.key]
            if inst.stopped_for is not None:
                reason, detail = inst.stopped_for
                self.stops.append(StopEntry(inst.model_id, inst.devices, reason, detail, now))
                log.info("instance.stopped", model=inst.model_id, devices=list(inst.devices),
                         reason=reason.value, detail=detail)
                self._emit("instance.stopped", {"model": inst.model_id,
                                                "devices": list(inst.devices),
                                                "reason": reason.value, "detail": detail})
        self._replan()

    def _failed(self, inst: ModelInstance, now: float) -> None:
        key = inst.key
        if inst.ever_ready:
            self._restarts[key] = self._restarts.get(key, 0) + 1
            quick = now - inst.ready_at < CRASH_LOOP_S
            self._crashes[key] = self._crashes.get(key, 0) + 1 if quick else 1
            n = self._crashes[key]
            backoff_after = 2  # one crash: restart on demand at once; a loop backs off
        else:
            self._failures[key] = self._failures.get(key, 0) + 1
            n = self._failures[key]
            backoff_after = 1  # a start that failed (after its retries) backs off at once
        self._failed_error[key] = inst.last_error or "failed"
        if n >= backoff_after:
            delay = min(self.config.load_failure_backoff_s * 2 ** (n - backoff_after),
                        MAX_BACKOFF_S)
            self._failed_until[key] = now + delay
            log.warning("instance.backoff", model=inst.model_id, devices=list(inst.devices),
                        failures=n, backoff_s=delay)
        for want in list(self._wants):
            if not want.future.done() and want.key == key:
                want.future.set_exception(ModelNotReady(inst.last_error or "load failed"))
        self._emit("instance.failed", {"model": inst.model_id, "devices": list(inst.devices),
                                       "error": inst.last_error, "crashed": inst.ever_ready})

    def emit(self, kind: str, data: dict[str, object]) -> None:
        """Tell the listeners (metrics) something happened to an instance."""
        self._emit(kind, data)

    def _emit(self, kind: str, data: dict[str, object]) -> None:
        for listener in self.listeners:
            listener(kind, data)
