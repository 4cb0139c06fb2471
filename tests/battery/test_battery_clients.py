"""Battery 6 and 8: clients that leave mid-stream or while queued free their places at once
with no traceback; 1,000 plain and 200 streamed requests leave no files or memory behind."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import psutil

from tests.battery.harness import (
    TRACEBACK,
    AgentSpec,
    chat,
    device_load,
    device_waiting,
    fake_models,
    one_stream,
    start_battery,
    tally,
)
from tests.waiting import wait_until

FIGURES: dict[str, object] = {}


def one_agent(tiny, tmp_path, **server_args) -> list[AgentSpec]:
    return [AgentSpec("node-a", [fake_models("letters", tiny["letters"], ["chat"],
                                             tmp_path / "node-a-spawns.jsonl",
                                             **server_args)])]


def done_lines(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        if '"request.done"' in line:
            out.append(json.loads(line))
    return out


async def test_clients_leaving_mid_stream_or_while_queued_free_their_places_quietly(
        tmp_path, tiny_models, fake_llama_server_bin):
    with start_battery(tmp_path, fake_llama_server_bin,
                       one_agent(tiny_models, tmp_path, **{"--fake-tokens-per-s": 20})) as c:
        url, headers = c.dispatcher.url, c.headers()
        async with aiohttp.ClientSession() as s:
            assert (await one_stream(s, url, chat("chat", max_tokens=2), headers)).kind() \
                == "done"
            streaming = asyncio.create_task(one_stream(s, url, chat("chat", max_tokens=200),
                                                       headers, cancel_after_events=2))
            queued = asyncio.create_task(one_stream(s, url, chat("chat", max_tokens=200),
                                                    headers))
            await wait_until(lambda: device_waiting(c.inventory("node-a")["devices"][0])
                             >= 1, what="one queued behind the stream")
            queued.cancel()  # the client gives up while it waits for its place
            assert (await streaming).cancelled

            def free() -> bool:
                device = c.inventory("node-a")["devices"][0]
                return (device_load(device) == 0
                        and c.nodes()["node-a"]["devices"][0]["dispatcher_in_flight"] == 0)
            await wait_until(free, timeout_s=20, what="both places given back")
            assert (await one_stream(s, url, chat("chat", max_tokens=2), headers)).kind() \
                == "done"
        for service in (c.dispatcher, c.agents["node-a"]):
            log = service.log()
            assert not TRACEBACK.search(log), log[-3000:]
            statuses = [d["status"] for d in done_lines(log)]
            assert 500 not in statuses
            assert statuses.count(499) == 2, statuses  # the gone clients, said so


async def test_1000_plain_and_200_streamed_requests_leave_no_files_or_memory_behind(
        tmp_path, tiny_models, fake_llama_server_bin):
    specs = one_agent(tiny_models, tmp_path)
    with start_battery(tmp_path, fake_llama_server_bin, specs) as c:
        url, headers = c.dispatcher.url, c.headers()
        procs = {"dispatcher": psutil.Process(c.dispatcher.proc.pid),
                 "agent": psutil.Process(c.agents["node-a"].proc.pid)}
        gate = asyncio.Semaphore(16)
        async with aiohttp.ClientSession() as s:

            async def plain() -> int:
                async with gate, s.post(url + "/v1/chat/completions",
                                        json=chat("chat", stream=False, max_tokens=4),
                                        headers=headers) as resp:
                    await resp.read()
                    return resp.status

            async def streamed(i: int):
                async with gate:
                    return await one_stream(s, url, chat("chat", max_tokens=8), headers,
                                            cancel_after_events=2 if i % 5 == 0 else None)

            await asyncio.gather(*(plain() for _ in range(100)))  # warm: pools, caches
            before = {k: (p.num_fds(), p.memory_info().rss) for k, p in procs.items()}
            statuses = await asyncio.gather(*(plain() for _ in range(1000)))
            streams = await asyncio.gather(*(streamed(i) for i in range(200)))
        assert statuses == [200] * 1000
        assert tally(streams) == {"done": 160, "cancelled": 40}

        def settled() -> bool:
            return all(p.num_fds() <= before[k][0] + 10 for k, p in procs.items())
        await wait_until(settled, timeout_s=30, what="open files back within +10")
        growth_mb = {k: (p.memory_info().rss - before[k][1]) / 2**20 for k, p in procs.items()}
        FIGURES["leaks"] = {"fds_before": {k: v[0] for k, v in before.items()},
                            "fds_after": {k: p.num_fds() for k, p in procs.items()},
                            "rss_growth_mb": {k: round(v, 1) for k, v in growth_mb.items()}}
        print("battery leaks:", FIGURES["leaks"])
        assert all(v < 30 for v in growth_mb.values()), growth_mb
        for service in (c.dispatcher, c.agents["node-a"]):  # the 40 that left: said so
            log = service.log()
            assert not TRACEBACK.search(log), log[-3000:]
            assert 500 not in [d["status"] for d in done_lines(log)]
