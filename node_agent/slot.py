"""One device's llama-server and the requests queued for it.

`DeviceSlot` is the only owner of the device's state, process and waiters. Callers ask for
an outcome — `async with slot.lease(model) as base_url:` — and never read-then-act. All
changes happen in synchronous sections of the event loop (so they are atomic), and every
event that could let work proceed (a request queued, finished or gone, a load done, a
crash) calls `_pump()`, which grants what can run and starts a switch when one is due.

Queueing rule: waiting requests for the loaded model go first. A request for another model
waits until the loaded model has no one waiting and nothing in flight, or until it has
waited `max_switch_wait_s` (never less than that model's last load time); then the slot
drains (no new grants), stops the process and starts the new model. This keeps a device
from ping-ponging between two models while not starving either.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from node_agent.config import ModelConfig
from node_agent.llama_argv import build_argv
from node_agent.llama_process import LlamaProcess, StartFailed
from node_agent.pidfiles import PidFiles
from node_agent.slot_state import check_transition
from rolemesh.api import SlotState
from rolemesh.child_env import child_env
from rolemesh.errors import DeviceBusy, ModelNotReady

log = structlog.get_logger("node_agent.slot")

RECENT_WINDOW_S = 600.0


class PortAllocator(Protocol):
    def __call__(self) -> int: ...


@dataclass(frozen=True)
class SlotSettings:
    binary: Path
    startup_timeout_s: float
    probe_interval_s: float
    stop_grace_s: float
    pending_limit: int
    max_switch_wait_s: float
    queue_timeout_s: float
    start_attempts: int = 3


@dataclass(eq=False)
class _Waiter:
    model: ModelConfig
    enqueued_at: float
    future: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(frozen=True)
class SlotSnapshot:
    device_id: str
    state: SlotState
    loaded_model: str | None
    in_flight: int
    pending: int
    pending_limit: int
    parallel: int
    last_error: str | None


def _is_early_exit(exc: BaseException) -> bool:
    return isinstance(exc, StartFailed) and exc.exited


class DeviceSlot:
    def __init__(self, device_id: str, pin_env: Mapping[str, str], settings: SlotSettings,
                 http: aiohttp.ClientSession, pidfiles: PidFiles, free_port: PortAllocator,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device_id = device_id
        self._pin_env = dict(pin_env)
        self._settings = settings
        self._http = http
        self._pidfiles = pidfiles
        self._free_port = free_port
        self._clock = clock

        self._state = SlotState.EMPTY
        self._process: LlamaProcess | None = None
        self._model: ModelConfig | None = None
        self._active = 0
        self._waiters: list[_Waiter] = []
        self._transition_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._failures = 0
        self._ready_since = 0.0
        self._last_error: str | None = None
        self._closing = False
        self.load_seconds: dict[str, float] = {}
        self._served: dict[str, deque[float]] = {}
        self.history: list[SlotState] = [SlotState.EMPTY]  # for operators and tests

    # -- what others may read -------------------------------------------------------------

    @property
    def state(self) -> SlotState:
        return self._state

    def snapshot(self) -> SlotSnapshot:
        holding = self._state in (SlotState.STARTING, SlotState.READY, SlotState.DRAINING)
        model = self._model if holding else None
        return SlotSnapshot(
            device_id=self.device_id, state=self._state,
            loaded_model=model.model_id if model else None,
            in_flight=self._active, pending=len(self._waiters),
            pending_limit=self._settings.pending_limit,
            parallel=model.parallel if model else 1, last_error=self._last_error)

    def recent_requests(self, model_id: str) -> int:
        served = self._served.get(model_id)
        if not served:
            return 0
        horizon = self._clock() - RECENT_WINDOW_S
        while served and served[0] < horizon:
            served.popleft()
        return len(served)

    # -- asking for an outcome --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, model: ModelConfig) -> AsyncIterator[str]:
        """Wait for a place to run a request for `model`; yields llama-server's base URL.

        Raises DeviceBusy at once when in-flight + waiting would pass the pending limit,
        ModelNotReady when the model could not be made ready. Leaving the block frees the
        place on every path: done, error, client gone, cancelled.
        """
        waiter = self._admit(model)
        done: set[asyncio.Future[str]] = {waiter.future}
        if not waiter.future.done():  # most requests are granted at once: skip the wait
            try:
                done, _ = await asyncio.wait({waiter.future},
                                             timeout=self._settings.queue_timeout_s)
            except asyncio.CancelledError:
                self._abandon(waiter)
                raise
        if not done:
            self._abandon(waiter)
            raise DeviceBusy(f"waited {self._settings.queue_timeout_s:g}s in the queue of "
                             f"{self.device_id} without a turn")
        base_url = waiter.future.result()  # raises the load's error, if any
        self._served.setdefault(model.model_id, deque()).append(self._clock())
        try:
            yield base_url
        finally:
            self._active -= 1
            self._pump()

    def _admit(self, model: ModelConfig) -> _Waiter:
        if self._closing:
            raise ModelNotReady(f"{self.device_id} is shutting down")
        if self._active + len(self._waiters) >= self._settings.pending_limit:
            raise DeviceBusy(f"{self.device_id} has {self._active} in flight and "
                             f"{len(self._waiters)} waiting (limit "
                             f"{self._settings.pending_limit}); retry shortly")
        waiter = _Waiter(model, self._clock())
        self._waiters.append(waiter)
        self._pump()
        return waiter

    def _abandon(self, waiter: _Waiter) -> None:
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self._active -= 1  # it was granted just as its client went away
        else:
            fut.cancel()
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        self._pump()

    async def shutdown(self) -> None:
        self._closing = True
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(ModelNotReady(f"{self.device_id} is shutting down"))
        self._waiters.clear()
        if self._transition_task is not None:
            self._transition_task.cancel()
            await asyncio.gather(self._transition_task, return_exceptions=True)
        await self._stop_process()
        if self._state is not SlotState.EMPTY:
            if self._state is not SlotState.STOPPING:
                self._set_state(SlotState.STOPPING)
            self._set_state(SlotState.EMPTY)

    # -- the one place that decides what happens next --------------------------------------

    def _pump(self) -> None:
        if self._closing or self._transition_task is not None:
            return  # a running transition pumps when it ends
        self._waiters = [w for w in self._waiters if not w.future.done()]
        if self._state in (SlotState.READY, SlotState.DRAINING):
            self._pump_loaded()
        elif self._state in (SlotState.EMPTY, SlotState.FAILED) and self._waiters:
            self._begin_switch(self._waiters[0].model)

    def _pump_loaded(self) -> None:
        assert self._model is not None
        assert self._process is not None
        loaded = self._model.model_id
        same = [w for w in self._waiters if w.model.model_id == loaded]
        other = [w for w in self._waiters if w.model.model_id != loaded]
        switch_due = bool(other) and ((not same and self._active == 0)
                                      or self._waited_too_long(other[0]))
        if self._state is SlotState.DRAINING and not other:
            self._set_state(SlotState.READY)  # whoever wanted the switch is gone
        if self._state is SlotState.READY and not switch_due:
            for w in same:
                if self._active >= self._model.parallel:
                    break
                self._active += 1
                self._waiters.remove(w)
                w.future.set_result(self._process.base_url)
            return
        if not other:
            return
        if self._state is SlotState.READY:
            self._set_state(SlotState.DRAINING)
        if self._active == 0:
            self._begin_switch(other[0].model)

    def _waited_too_long(self, waiter: _Waiter) -> bool:
        """Has `waiter` been held back by the loaded model for long enough?

        Held back counts from when it queued or when the loaded model became ready,
        whichever is later: after a switch, the new model's own waiters are served before
        anyone's patience can force the next switch (else two models ping-pong).
        """
        bound = max(self._settings.max_switch_wait_s,
                    self.load_seconds.get(waiter.model.model_id, 0.0))
        held_since = max(waiter.enqueued_at, self._ready_since)
        return self._clock() - held_since >= bound

    def _begin_switch(self, model: ModelConfig) -> None:
        self._transition_task = asyncio.create_task(self._switch_to(model),
                                                    name=f"switch {self.device_id}")

    # -- process lifecycle -------------------------------------------------------------------

    async def _switch_to(self, model: ModelConfig) -> None:
        try:
            await self._stop_process()
            if self._failures:
                delay = min(0.25 * 2 ** (self._failures - 1), 10.0)
                log.info("slot.restart_backoff", device=self.device_id, delay_s=delay,
                         failures=self._failures)
                await asyncio.sleep(delay)
            await self._start_with_retries(model)
        except StartFailed as exc:
            self._failures += 1
            self._last_error = exc.message
            log.error("slot.start_failed", device=self.device_id, model=model.model_id,
                      error=exc.message)
            self._fail_waiters_for(model.model_id, exc.message)
        finally:
            self._transition_task = None
            self._pump()

    async def _start_with_retries(self, model: ModelConfig) -> None:
        retrying = AsyncRetrying(stop=stop_after_attempt(self._settings.start_attempts),
                                 wait=wait_exponential(multiplier=0.2, max=5.0),
                                 retry=retry_if_exception(_is_early_exit), reraise=True)
        async for attempt in retrying:
            with attempt:
                await self._start_once(model)

    async def _start_once(self, model: ModelConfig) -> None:
        port = self._free_port()
        argv = build_argv(self._settings.binary, model, port)
        env = {**child_env(os.environ), **self._pin_env}
        self._model = model
        self._set_state(SlotState.STARTING)
        started = self._clock()
        try:
            proc = await LlamaProcess.spawn(argv, port, env)
        except OSError as exc:
            self._set_state(SlotState.FAILED)
            raise StartFailed(f"cannot start {argv[0]}: {exc}", exited=True) from exc
        self._process = proc
        self._pidfiles.write(self.device_id, proc.pid)
        try:
            ready = await proc.wait_ready(self._http, model.alias or model.model_id,
                                          self._settings.startup_timeout_s,
                                          self._settings.probe_interval_s)
        except StartFailed:
            self._set_state(SlotState.FAILED)
            await self._stop_process()
            raise
        except asyncio.CancelledError:
            await self._stop_process()
            raise
        elapsed = self._clock() - started
        self.load_seconds[model.model_id] = elapsed
        self._failures = 0
        self._last_error = None
        self._ready_since = self._clock()
        self._set_state(SlotState.READY)
        log.info("slot.model_ready", device=self.device_id, model=model.model_id,
                 load_s=round(elapsed, 4), ready_s=round(ready.ready_s, 4), probes=ready.probes,
                 pid=proc.pid, port=port)
        self._watch_task = asyncio.create_task(self._watch(proc))

    async def _watch(self, proc: LlamaProcess) -> None:
        """Notice a crash at once, not at the next request."""
        code = await proc.wait_exit()
        if proc is not self._process:
            return  # we stopped it ourselves
        self._process = None
        self._pidfiles.remove(self.device_id)
        self._failures += 1
        model_id = self._model.model_id if self._model else None
        self._last_error = (f"llama-server for {model_id} exited with code {code}: "
                            f"{proc.tail_text(6) or '(no output)'}")
        log.error("llama.crashed", device=self.device_id, model=model_id, exit_code=code,
                  pid=proc.pid, stderr_tail=proc.tail_text(12))
        self._set_state(SlotState.FAILED)
        self._pump()

    async def _stop_process(self) -> None:
        proc, self._process = self._process, None
        if proc is None:
            return
        if self._state in (SlotState.READY, SlotState.DRAINING, SlotState.STARTING):
            self._set_state(SlotState.STOPPING)
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None
        code = await proc.stop(self._settings.stop_grace_s)
        self._pidfiles.remove(self.device_id)
        log.info("llama.stopped", device=self.device_id, pid=proc.pid, exit_code=code)

    def _fail_waiters_for(self, model_id: str, message: str) -> None:
        for w in list(self._waiters):
            if w.model.model_id == model_id and not w.future.done():
                w.future.set_exception(ModelNotReady(message))
                self._waiters.remove(w)

    def _set_state(self, new: SlotState) -> None:
        old = self._state
        check_transition(old, new)
        self._state = new
        self.history.append(new)
        log.info("slot.state_changed", device=self.device_id, old=old.value, new=new.value,
                 model=self._model.model_id if self._model else None)
