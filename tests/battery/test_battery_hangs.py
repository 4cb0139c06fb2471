"""Battery 2: an agent that accepts connections and never answers (SIGSTOP, a black-hole
proxy), and proxies that drop or reset: requests fail over, other roles are not held up."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest

from tests.battery.harness import (
    TOKEN,
    AgentSpec,
    chat,
    device_ready,
    fake_models,
    one_stream,
    start_battery,
)
from tests.waiting import wait_until

BOUND_S = 2.0


def specs(tiny, tmp_path, proxied: str | None = None) -> list[AgentSpec]:
    out = []
    for node_id in ("node-a", "node-b"):
        record = tmp_path / f"{node_id}-spawns.jsonl"
        out.append(AgentSpec(node_id, [fake_models("letters", tiny["letters"], ["chat"],
                                                   record)], proxied=node_id == proxied))
    record = tmp_path / "node-c-spawns.jsonl"
    out.append(AgentSpec("node-c", [fake_models("digits", tiny["digits"], ["math"], record)]))
    return out


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "non-streamed"])
async def test_a_frozen_host_is_failed_over_after_the_first_byte_bound_then_avoided(
        tmp_path, tiny_models, fake_llama_server_bin, stream):
    # Non-streamed: after the bound the dispatcher asks /health, which a frozen host does
    # not answer within connect_timeout_s either.
    extra = {"first_byte_timeout_s": BOUND_S, "node_timeout_s": 60.0,
             "connect_timeout_s": 1.0}
    with start_battery(tmp_path, fake_llama_server_bin, specs(tiny_models, tmp_path),
                       dispatcher_extra=extra) as cluster:
        url, headers = cluster.dispatcher.url, cluster.headers()
        async with aiohttp.ClientSession() as s:
            assert (await one_stream(s, url, chat("chat"), headers)).kind() == "done"
            assert (await one_stream(s, url, chat("math"), headers)).kind() == "done"
            loaded = next(n for n in ("node-a", "node-b") if cluster.spawns(n))
            os.kill(cluster.agents[loaded].proc.pid, signal.SIGSTOP)
            try:
                frozen = asyncio.create_task(one_stream(s, url, chat("chat", stream=stream),
                                                        headers))
                other = asyncio.create_task(one_stream(s, url, chat("math"), headers))
                first, _ = await asyncio.wait({frozen, other},
                                              return_when=asyncio.FIRST_COMPLETED)
                assert other in first  # another role is not held up by the frozen host
                assert other.result().kind() == "done"
                answer = await frozen  # failed over after the bound
                assert answer.status == 200
                assert answer.kind() == "done" if stream else b'"choices"' in answer.events[0]
                more = [await one_stream(s, url, chat("chat"), headers) for _ in range(5)]
                assert [r.kind() for r in more] == ["done"] * 5
                metrics = cluster.metrics()
                # Only the first request waited on the frozen host: then it was suspect.
                assert metrics['rolemesh_dispatcher_failovers_total{reason='
                               '"first_byte_timeout"}'] == 1
                assert metrics["rolemesh_dispatcher_suspects_total"] == 1
            finally:
                os.kill(cluster.agents[loaded].proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("mode", ["blackhole", "drop", "reset"])
async def test_a_proxy_that_black_holes_drops_or_resets_fails_requests_over(
        tmp_path, tiny_models, fake_llama_server_bin, mode):
    extra = {"first_byte_timeout_s": BOUND_S, "node_timeout_s": 60.0}
    with start_battery(tmp_path, fake_llama_server_bin,
                       specs(tiny_models, tmp_path, proxied="node-b"),
                       dispatcher_extra=extra) as cluster:
        url, headers = cluster.dispatcher.url, cluster.headers()
        proxy = cluster.proxies["node-b"]
        async with aiohttp.ClientSession() as s:
            # Both devices hold the model (loaded by a request straight to each agent).
            for node_id in ("node-a", "node-b"):
                warm = await one_stream(s, cluster.agents[node_id].url, chat("chat"),
                                        {"Authorization": f"Bearer {TOKEN}"})
                assert warm.kind() == "done"
            await wait_until(lambda: all(
                device_ready(cluster.nodes()[n]["devices"][0]["status"], "letters")
                for n in ("node-a", "node-b")), what="both loaded, as the dispatcher sees")
            proxy.set(mode)
            results = await asyncio.gather(*(one_stream(s, url, chat("chat"), headers)
                                             for _ in range(6)))
            assert [r.kind() for r in results] == ["done"] * 6
            proxy.set("pass")
        # Six at once spread over both loaded devices: node-b's share failed over.
        assert cluster.metric_sum("rolemesh_dispatcher_failovers_total") >= 1
        assert proxy.accepted >= 1


async def test_a_slow_network_under_the_bound_is_not_taken_for_a_dead_host(
        tmp_path, tiny_models, fake_llama_server_bin):
    extra = {"first_byte_timeout_s": BOUND_S, "node_timeout_s": 60.0}
    with start_battery(tmp_path, fake_llama_server_bin,
                       specs(tiny_models, tmp_path, proxied="node-b")[1:2],
                       dispatcher_extra=extra) as cluster:
        proxy = cluster.proxies["node-b"]
        proxy.set("delay", delay_s=0.2)  # each chunk each way, well under the bound
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(*(one_stream(s, cluster.dispatcher.url,
                                                        chat("chat"), cluster.headers())
                                             for _ in range(3)))
        assert [r.kind() for r in results] == ["done"] * 3
        assert proxy.accepted >= 1
        assert cluster.metric_sum("rolemesh_dispatcher_failovers_total") == 0
        assert cluster.metrics()["rolemesh_dispatcher_suspects_total"] == 0
