"""Telling a frozen agent from a busy one while a non-streamed answer is awaited.

A non-streamed answer's headers come with the whole answer, so a long generation and a
frozen host (SIGSTOPped, a black hole in the network: TCP still accepts) look the same from
the request alone. After every `every_s` without an answer the watch asks the agent's
`/health`; an agent that does not answer that within `probe_timeout_s` is taken as frozen
and the wait is ended (its `asyncio.Timeout` is moved to now), so the request fails over.
A live agent keeps the request for as long as the generation takes (`request_timeout_s`).
Costs one timer per request until the first `every_s` passes.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp


class LivenessWatch:
    def __init__(self, http: aiohttp.ClientSession, health_url: str, every_s: float,
                 probe_timeout_s: float, wait: asyncio.Timeout) -> None:
        self._http = http
        self._url = health_url
        self._every_s = every_s
        self._probe_timeout = aiohttp.ClientTimeout(total=probe_timeout_s)
        self._wait = wait
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._handle = self._loop.call_later(every_s, self._start_probe)
        self.frozen = False

    def _start_probe(self) -> None:
        self._task = self._loop.create_task(self._probe())

    async def _probe(self) -> None:
        try:
            async with self._http.get(self._url, timeout=self._probe_timeout) as resp:
                await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            self.frozen = True
            self._wait.reschedule(self._loop.time())  # ends the request's wait now
            return
        self._handle = self._loop.call_later(self._every_s, self._start_probe)

    def close(self) -> None:
        self._handle.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                self._task.exception()
