"""Battery 7 and SIGTERM: a dispatcher killed with -9 and restarted, an agent killed with -9
and restarted (it reaps its old llama-servers first), a dispatcher stopped with SIGTERM
while a stream is open (the stream finishes, new requests are refused, exit 0)."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import aiohttp
import psutil

from tests.battery.harness import (
    HEARTBEAT_S,
    AgentSpec,
    chat,
    fake_models,
    one_stream,
    start_battery,
)
from tests.processes import start_service
from tests.waiting import wait_until


def specs(tiny, tmp_path, **server_args) -> list[AgentSpec]:
    return [AgentSpec(n, [fake_models("letters", tiny["letters"], ["chat"],
                                      tmp_path / f"{n}-spawns.jsonl", **server_args)])
            for n in ("node-a", "node-b")]


def shape(nodes: dict) -> dict:
    """What a node reported, less the figures that move."""
    return {n: ([d["status"]["device_id"] for d in v["devices"]],
                sorted(m["model_id"] for m in v["models"]), v["url"]) for n, v in nodes.items()}


async def test_a_dispatcher_killed_with_9_gets_every_node_back_with_the_same_inventory(
        tmp_path, tiny_models, fake_llama_server_bin):
    with start_battery(tmp_path, fake_llama_server_bin, specs(tiny_models, tmp_path)) as c:
        before = shape(c.nodes())
        c.dispatcher.proc.kill()
        c.dispatcher.proc.wait()
        restart = tmp_path / "restart"
        restart.mkdir()
        with start_service("dispatcher", c.dispatcher_config, restart) as again:
            c.dispatcher = again
            # Agents re-register at their next heartbeat (HEARTBEAT_S); a generous bound.
            await wait_until(lambda: set(c.nodes()) == {"node-a", "node-b"},
                             timeout_s=max(10.0, 20 * HEARTBEAT_S), what="re-registered")
            assert shape(c.nodes()) == before
            async with aiohttp.ClientSession() as s:
                result = await one_stream(s, again.url, chat("chat"), c.headers())
            assert result.kind() == "done"


async def test_an_agent_killed_with_9_reaps_its_old_llama_server_before_it_serves(
        tmp_path, tiny_models, fake_llama_server_bin):
    with start_battery(tmp_path, fake_llama_server_bin,
                       specs(tiny_models, tmp_path)[:1]) as c:
        async with aiohttp.ClientSession() as s:
            assert (await one_stream(s, c.dispatcher.url, chat("chat"),
                                     c.headers())).kind() == "done"
        orphan = c.spawns("node-a")[-1]["pid"]
        c.agents["node-a"].proc.kill()
        c.agents["node-a"].proc.wait()
        assert psutil.pid_exists(orphan)  # kill -9 leaves the child behind
        restart = tmp_path / "restart"
        restart.mkdir()
        with start_service("node_agent", c.agent_configs["node-a"], restart) as again:
            # /health answers once the port is bound; the reaping came before it.
            with contextlib.suppress(psutil.NoSuchProcess):
                assert psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
            c.agents["node-a"] = again
            c.wait_nodes_up(["node-a"])
            async with aiohttp.ClientSession() as s:
                assert (await one_stream(s, c.dispatcher.url, chat("chat"),
                                         c.headers())).kind() == "done"


async def test_sigterm_lets_an_open_stream_finish_refuses_new_requests_and_exits_0(
        tmp_path, tiny_models, fake_llama_server_bin):
    with start_battery(tmp_path, fake_llama_server_bin,
                       specs(tiny_models, tmp_path, **{"--fake-tokens-per-s": 20})[:1],
                       dispatcher_extra={"shutdown_grace_s": 30.0}) as c:
        url, headers = c.dispatcher.url, c.headers()
        async with aiohttp.ClientSession() as s:
            assert (await one_stream(s, url, chat("chat", max_tokens=2), headers)).kind() \
                == "done"
            long = asyncio.create_task(one_stream(s, url, chat("chat", max_tokens=40),
                                                  headers))
            await wait_until(lambda: c.nodes()["node-a"]["devices"][0]
                             ["dispatcher_in_flight"] == 1, what="the stream is open")
            c.dispatcher.proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: "stopping" in c.dispatcher.log(), what="stopping")
            async with aiohttp.ClientSession() as fresh:
                refused = await one_stream(fresh, url, chat("chat"), headers, hang_s=10)
            assert refused.status is None  # a new connection is not taken
            result = await long
        assert result.kind() == "done"
        assert await asyncio.to_thread(c.dispatcher.proc.wait, 30) == 0


async def test_sigterm_to_an_agent_lets_its_open_stream_finish_and_stops_its_children(
        tmp_path, tiny_models, fake_llama_server_bin):
    with start_battery(tmp_path, fake_llama_server_bin,
                       specs(tiny_models, tmp_path, **{"--fake-tokens-per-s": 20})[:1]) as c:
        url, headers = c.dispatcher.url, c.headers()
        async with aiohttp.ClientSession() as s:
            assert (await one_stream(s, url, chat("chat", max_tokens=2), headers)).kind() \
                == "done"
            children = c.live_llama_servers()
            assert children
            long = asyncio.create_task(one_stream(s, url, chat("chat", max_tokens=30),
                                                  headers))
            await wait_until(lambda: c.nodes()["node-a"]["devices"][0]
                             ["dispatcher_in_flight"] == 1, what="the stream is open")
            agent = c.agents["node-a"]
            agent.proc.send_signal(signal.SIGTERM)
            result = await long
        assert result.kind() == "done"
        assert await asyncio.to_thread(agent.proc.wait, 30) == 0
        assert c.live_llama_servers() == []


async def test_an_agent_stopped_with_sigterm_is_gone_from_the_dispatcher_at_once(
        tmp_path, tiny_models, fake_llama_server_bin):
    with start_battery(tmp_path, fake_llama_server_bin, specs(tiny_models, tmp_path)[:1],
                       dispatcher_extra={"node_timeout_s": 120.0, "node_forget_s": 600.0}) as c:
        c.agents["node-a"].proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(c.agents["node-a"].proc.wait, 30) == 0
        # With a 120 s node timeout only a deregistration explains a node no longer up.
        node = c.nodes().get("node-a")
        assert node is None or node["state"] != "up"
