"""One model instance: one llama-server process serving one model on its placement.

The instance owns its process's lifecycle (`empty -> starting -> ready [-> draining] ->
stopping -> empty`, or `failed`), through the `Launcher` seam. It never decides anything:
the node's scheduler tells it to start, drain, undrain or stop, and hears back through
`on_change` whenever its state changes. An instance lives once; a restart is a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from node_agent.config import ModelConfig
from node_agent.instance_state import check_transition
from node_agent.launcher import Launcher, RunningProcess
from node_agent.llama_process import StartFailed
from rolemesh.api import InstanceState, StopReason
from rolemesh.planner import instance_key

log = structlog.get_logger("node_agent.instance")
S = InstanceState


class ModelInstance:
    def __init__(self, model: ModelConfig, devices: tuple[str, ...], charged_mb: dict[str, int],
                 *, launcher: Launcher, clock: Callable[[], float],
                 on_change: Callable[[ModelInstance], None], stop_grace_s: float,
                 restarts: int = 0, estimated_mb: int | None = None,
                 before_start: Callable[[ModelInstance], Awaitable[None]] | None = None) -> None:
        self.model = model
        self.devices = devices
        self.key = instance_key(model.model_id, devices)
        self.charged_mb = charged_mb
        self.estimated_mb = estimated_mb
        self.measured_mb: int | None = None
        self._launcher = launcher
        self._before_start = before_start
        self._clock = clock
        self._on_change = on_change
        self._stop_grace_s = stop_grace_s
        self.state = S.EMPTY
        self.history: list[InstanceState] = [S.EMPTY]
        self.process: RunningProcess | None = None
        self.in_flight = 0
        self.started_at = clock()
        self.ready_at = 0.0
        self.idle_since: float | None = None
        self.draining_for: str | None = None
        self.stop_reason: StopReason | None = None  # an operator's stop under way
        self.stop_by: float | None = None
        self.stopped_for: tuple[StopReason, str | None] | None = None  # how it ended
        self.last_load_s: float | None = None
        self.last_error: str | None = None
        self.restarts = restarts
        self.ever_ready = False
        self.ended = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def base_url(self) -> str:
        assert self.process is not None
        return self.process.base_url

    # -- what the scheduler asks -------------------------------------------------------------

    def begin(self) -> None:
        self._set(S.STARTING)
        self._run_task = asyncio.create_task(self._run(), name=f"instance {self.key}")

    def acquire(self) -> None:
        self.in_flight += 1
        self.idle_since = None

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle_since = self._clock()

    def drain(self, why: str) -> None:
        self.draining_for = why
        if self.state is S.READY:
            self._set(S.DRAINING)

    def undrain(self) -> None:
        self.draining_for = None
        if self.state is S.DRAINING:
            self._set(S.READY)

    def stop(self, reason: StopReason, detail: str | None = None) -> None:
        if self._stop_task is not None or self.state in (S.EMPTY, S.FAILED, S.STOPPING):
            return
        self.stopped_for = (reason, detail)
        log.info("instance.stopping", model=self.model_id, devices=list(self.devices),
                 reason=reason.value, detail=detail, in_flight=self.in_flight)
        self._set(S.STOPPING)
        self._stop_task = asyncio.create_task(self._stop(), name=f"stop {self.key}")

    async def wait_ended(self) -> None:
        await self.ended.wait()

    # -- the process ---------------------------------------------------------------------------

    async def _run(self) -> None:
        started = self._clock()
        try:
            if self._before_start is not None:
                await self._before_start(self)
            proc = await self._launcher.launch(self.model, self.devices)
        except StartFailed as exc:
            self.last_error = exc.message
            log.error("instance.start_failed", model=self.model_id, devices=list(self.devices),
                      error=exc.message)
            self._fail()
            return
        except asyncio.CancelledError:
            return  # stopped while starting: _stop finishes the job
        if self.state is S.STOPPING:  # a stop came just as it became ready
            self.process = proc
            return
        self.process = proc
        self.last_load_s = self._clock() - started
        self.ready_at = self.idle_since = self._clock()
        self.ever_ready = True
        log.info("instance.ready", model=self.model_id, devices=list(self.devices),
                 load_s=round(self.last_load_s, 4), pid=proc.pid)
        self._set(S.READY)
        code = await proc.wait_exit()
        if self.state in (S.STOPPING, S.EMPTY):
            return  # we stopped it
        self.last_error = (f"llama-server for {self.model_id} exited with code {code}: "
                           f"{proc.tail_text(6) or '(no output)'}")
        self.stopped_for = (StopReason.CRASH, f"exit code {code}")
        log.error("llama.crashed", model=self.model_id, devices=list(self.devices),
                  exit_code=code, pid=proc.pid, stderr_tail=proc.tail_text(12))
        self._fail()

    async def _stop(self) -> None:
        run = self._run_task
        if run is not None and not run.done() and self.process is None:
            run.cancel()  # still loading: the launcher stops what it spawned
            await asyncio.gather(run, return_exceptions=True)
        proc, self.process = self.process, None
        if proc is not None:
            code = await proc.stop(self._stop_grace_s)
            log.info("llama.stopped", model=self.model_id, pid=proc.pid, exit_code=code)
        if run is not None and not run.done():
            with contextlib.suppress(asyncio.CancelledError):
                await run
        self._set(S.EMPTY)
        self.ended.set()

    def _fail(self) -> None:
        self.process = None
        self._set(S.FAILED)
        self._set(S.EMPTY)
        self.ended.set()

    def _set(self, new: InstanceState) -> None:
        old = self.state
        check_transition(old, new)
        self.state = new
        self.history.append(new)
        log.info("instance.state_changed", model=self.model_id, devices=list(self.devices),
                 old=old.value, new=new.value)
        self._on_change(self)
