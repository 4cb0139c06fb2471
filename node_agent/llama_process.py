"""One llama-server child: spawn, wait for readiness, stop. A written protocol.

Start: spawn in its own session (so the whole group can be signalled), keep the tail of
its output, and probe readiness while also watching for an early exit, so a model that
cannot load fails fast with its exit code and last lines instead of at the timeout.
Stop: TERM to the group, a grace period, KILL, wait. (A llama-server with a request in
flight ignores the first TERM until that client goes away, hence the KILL.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
import structlog

log = structlog.get_logger("node_agent.llama_process")

LOG_RING_LINES = 500  # llama-server's own output kept per instance, for operators
FOLLOWER_QUEUE = 1000  # lines a `follow` reader may lag behind before it loses some
# What llama-server prints when it is about to answer /health with 200.
READY_HINTS = ("model loaded", "listening on http")


_SECRET_FLAG_WORDS = ("key", "token", "secret", "password")


def masked_argv(argv: Sequence[str]) -> list[str]:
    """argv for the log: the value after a flag such as --api-key is hidden."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg.startswith("-") and any(w in arg.lower() for w in _SECRET_FLAG_WORDS):
            out[i + 1] = "***"
    return out


class StartFailed(Exception):
    """The process exited or never became ready; `message` says which and why."""

    def __init__(self, message: str, *, exited: bool) -> None:
        super().__init__(message)
        self.message = message
        self.exited = exited


@dataclass(frozen=True)
class Readiness:
    spawn_s: float
    ready_s: float  # from spawn to both probes passing
    probes: int


class LlamaProcess:
    def __init__(self, proc: asyncio.subprocess.Process, argv: Sequence[str], port: int) -> None:
        self.proc = proc
        self.argv = list(argv)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.tail: deque[str] = deque(maxlen=LOG_RING_LINES)
        self._followers: set[asyncio.Queue[str | None]] = set()
        # Set when llama-server says it has loaded or listens: probe at once, not at the
        # next backed-off poll (a multi-second load would otherwise be noticed late).
        self._ready_hint = asyncio.Event()
        self._reader = asyncio.create_task(self._read_output())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @classmethod
    async def spawn(cls, argv: Sequence[str], port: int, env: Mapping[str, str]) -> LlamaProcess:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=dict(env), start_new_session=True)
        log.info("llama.spawned", pid=proc.pid, port=port, argv=masked_argv(argv))
        return cls(proc, argv, port)

    async def _read_output(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                for q in self._followers:
                    with contextlib.suppress(asyncio.QueueFull):
                        q.put_nowait(None)  # the end of this process's output
                return
            text = line.decode(errors="replace").rstrip()
            self.tail.append(text)
            for q in self._followers:
                with contextlib.suppress(asyncio.QueueFull):  # a slow reader skips lines
                    q.put_nowait(text)
            if any(hint in text for hint in READY_HINTS):
                self._ready_hint.set()

    def tail_text(self, lines: int = 12) -> str:
        return "\n".join(list(self.tail)[-lines:])

    def log_lines(self, last: int | None = None) -> list[str]:
        """The last `last` (default: all kept) lines of llama-server's output."""
        lines = list(self.tail)
        return lines if last is None else lines[-last:] if last > 0 else []

    @contextlib.contextmanager
    def follow(self) -> Iterator[asyncio.Queue[str | None]]:
        """A queue of the lines printed from now on; None once the process's output ended."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(FOLLOWER_QUEUE)
        if self._reader.done():
            queue.put_nowait(None)
        self._followers.add(queue)
        try:
            yield queue
        finally:
            self._followers.discard(queue)

    async def wait_exit(self) -> int:
        code = await self.proc.wait()
        # Let the reader drain what the process wrote before it died.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
        return code

    async def wait_ready(self, session: aiohttp.ClientSession, model_name: str,
                         timeout_s: float, max_interval_s: float) -> Readiness:
        """Poll /health then /v1/models until both pass, the process exits, or time runs out.

        Polls start every 5 ms and back off to max_interval_s: a small model is ready
        within tens of milliseconds, a big one takes seconds, and both are noticed quickly
        without hammering the server while it loads. When llama-server prints that it has
        loaded, the next poll goes at once instead of waiting out the interval.
        """
        started = time.monotonic()
        exit_task = asyncio.ensure_future(self.proc.wait())
        probe_task = asyncio.ensure_future(
            self._probe_until_ready(session, model_name, max_interval_s))
        try:
            done, _ = await asyncio.wait({exit_task, probe_task}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if probe_task in done:
                probes = probe_task.result()
                return Readiness(0.0, time.monotonic() - started, probes)
            if exit_task in done:
                code = await self.wait_exit()
                raise StartFailed(f"llama-server exited with code {code} while loading "
                                  f"{model_name}: {self.tail_text(6) or '(no output)'}",
                                  exited=True)
            raise StartFailed(f"{model_name} was not ready within {timeout_s:g}s "
                              f"(llama_server_startup_timeout_s)", exited=False)
        finally:
            for task in (exit_task, probe_task):
                if not task.done():
                    task.cancel()
            await asyncio.gather(exit_task, probe_task, return_exceptions=True)

    async def _probe_until_ready(self, session: aiohttp.ClientSession, model_name: str,
                                 max_interval_s: float) -> int:
        interval = min(0.005, max_interval_s)
        probes = 0
        timeout = aiohttp.ClientTimeout(total=max(2.0, max_interval_s * 4))
        while True:
            probes += 1
            if await self._is_ready(session, model_name, timeout):
                return probes
            try:
                await asyncio.wait_for(self._ready_hint.wait(), interval)
                self._ready_hint.clear()  # one immediate probe per hint, then back to polling
            except TimeoutError:
                interval = min(interval * 2, max_interval_s)

    async def _is_ready(self, session: aiohttp.ClientSession, model_name: str,
                        timeout: aiohttp.ClientTimeout) -> bool:
        try:
            async with session.get(self.base_url + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    return False
            async with session.get(self.base_url + "/v1/models", timeout=timeout) as resp:
                if resp.status != 200:
                    return False
                body = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return False
        ids = {str(m.get("id")) for m in body.get("data", []) if isinstance(m, dict)}
        return model_name in ids

    async def stop(self, grace_s: float) -> int:
        """TERM the group, wait up to grace_s, then KILL; returns the exit code."""
        if self.proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except TimeoutError:
                log.warning("llama.kill_after_grace", pid=self.pid, grace_s=grace_s)
                self._signal_group(signal.SIGKILL)
                await self.proc.wait()
        # Anything else left in its group (llama-server spawns none, but be sure).
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
        self._reader.cancel()
        return self.proc.returncode if self.proc.returncode is not None else -1

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
