"""Buffering at the dispatcher: a real dispatcher app on loopback, a fake agent whose one
device takes 2 requests at once (its pending limit), answers held until the test lets go."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.fakes.fake_agent import (
    FakeAgent,
    FakeDevice,
    FakeModel,
    chat,
    dispatcher_config,
    running_agents,
    running_dispatcher,
)
from tests.waiting import wait_until

MODELS = [FakeModel("planner-7b", ["planner"])]


def agent() -> FakeAgent:
    a = FakeAgent("node-a", [FakeDevice("gpu:0", loaded=["planner-7b"], pending_limit=2)],
                  MODELS)
    a.knobs.hold = asyncio.Event()
    return a


async def ask(s: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], Any]:
    async with s.post(url + "/v1/chat/completions", json=chat("planner")) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


def held(d: Any) -> int:
    return len(d.state.forwarder.buffer)


async def test_a_burst_beyond_the_pending_limit_is_held_and_served_not_refused():
    a = agent()
    config = dispatcher_config(max_buffered_requests=16, buffer_timeout_s=60)
    async with running_agents(a), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        burst = [asyncio.create_task(ask(s, d.url)) for _ in range(6)]
        # Two reach the device (its limit); four wait at the dispatcher. (Both are waited
        # for: a request routed is not yet one the agent has seen.)
        await wait_until(lambda: held(d) == 4 and len(a.seen) == 2,
                         what="two requests at the device, four held")
        a.knobs.hold.set()
        answers = await asyncio.gather(*burst)
        assert [status for status, _, _ in answers] == [200] * 6
        assert len(a.seen) == 6
        assert held(d) == 0


async def test_past_the_count_a_503_with_retry_after_and_past_the_time_a_504():
    a = agent()
    config = dispatcher_config(max_buffered_requests=1, buffer_timeout_s=0.5)
    async with running_agents(a), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        running = [asyncio.create_task(ask(s, d.url)) for _ in range(2)]
        await wait_until(lambda: len(a.seen) == 2, what="the device full")
        waiting = asyncio.create_task(ask(s, d.url))
        await wait_until(lambda: held(d) == 1, what="one held")
        status, headers, body = await ask(s, d.url)  # the buffer is full: refused at once
        assert status == 503
        assert body["error"]["code"] == "device_busy"
        assert int(headers["Retry-After"]) >= 1
        status, _, body = await waiting  # held its whole time, nothing freed
        assert status == 504
        assert body["error"]["code"] == "queue_timeout"
        assert "waited 0.5 s at the dispatcher" in body["error"]["message"]
        a.knobs.hold.set()
        assert [r[0] for r in await asyncio.gather(*running)] == [200, 200]
        assert len(a.seen) == 2  # neither the refused nor the timed-out one reached it


async def test_a_client_that_leaves_while_held_is_dropped_at_once():
    a = agent()
    config = dispatcher_config(max_buffered_requests=16, buffer_timeout_s=60)
    async with running_agents(a), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        running = [asyncio.create_task(ask(s, d.url)) for _ in range(2)]
        await wait_until(lambda: len(a.seen) == 2, what="the device full")
        leaving = aiohttp.ClientSession()
        gone = asyncio.create_task(ask(leaving, d.url))
        await wait_until(lambda: held(d) == 1, what="one held")
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        await leaving.close()
        await wait_until(lambda: held(d) == 0, what="the held request dropped")
        a.knobs.hold.set()
        assert [r[0] for r in await asyncio.gather(*running)] == [200, 200]
        status, _, _ = await ask(s, d.url)
        assert status == 200
        assert len(a.seen) == 3  # the one that left never reached the agent
