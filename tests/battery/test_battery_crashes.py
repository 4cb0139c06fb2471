"""Battery 1, 3, 4, 5: llama-servers killed under load, a stalled stream, a model switch
under load, a crash loop. Real dispatcher and agents, the fake llama-server, loopback."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import aiohttp
import psutil

from tests.battery.harness import (
    TOKEN,
    AgentSpec,
    chat,
    device_load,
    device_ready,
    fake_models,
    one_stream,
    start_battery,
    tally,
)
from tests.waiting import wait_until

FIGURES: dict[str, object] = {}


def spec(node_id: str, tiny, tmp_path, extra: dict | None = None,
         **server_args) -> AgentSpec:
    record = tmp_path / f"{node_id}-spawns.jsonl"
    return AgentSpec(node_id, [fake_models("letters", tiny["letters"], ["chat"], record,
                                           **server_args)], extra or {})


def serving_letters(device: dict) -> bool:
    """The device has letters ready and is not backing off from a crash."""
    return not device.get("failed_models") and device_ready(device, "letters")


async def test_300_streams_while_llama_servers_are_killed_every_2_s_lose_nothing(
        tmp_path, tiny_models, fake_llama_server_bin):
    # A llama-server killed again soon after its restart is a crash loop and backs off
    # (docs/lifecycle.md); a short backoff brings a node back within the storm.
    specs = [spec(f"node-{i}", tiny_models, tmp_path, {"load_failure_backoff_s": 0.5},
                  **{"--fake-tokens-per-s": 150, "--fake-close-after-stream": True})
             for i in range(3)]
    with start_battery(tmp_path, fake_llama_server_bin, specs) as cluster:
        url, headers = cluster.dispatcher.url, cluster.headers()
        dispatcher = psutil.Process(cluster.dispatcher.proc.pid)
        async with aiohttp.ClientSession() as s:
            # Warm: every device loaded, the pool at its working size.
            warm = await asyncio.gather(*(one_stream(s, url, chat("chat"), headers)
                                          for _ in range(16)))
            assert tally(warm) == {"done": 16}
            fds_before = dispatcher.num_fds()
            gate = asyncio.Semaphore(16)
            stop = asyncio.Event()
            kills = 0

            def serving(node_id: str) -> bool:
                return serving_letters(cluster.inventory(node_id)["devices"][0])

            async def killer() -> None:
                nonlocal kills
                rng = random.Random(13)
                while not stop.is_set():
                    await asyncio.sleep(2.0)
                    # Kill on one node while the others serve: with every node backing
                    # off at once there would be nowhere to fail over to.
                    up = [n for n in cluster.agents if await asyncio.to_thread(serving, n)]
                    if len(up) < len(cluster.agents):
                        continue
                    pids = cluster.live_llama_servers(rng.choice(up))
                    if pids:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1

            async def one(i: int):
                async with gate:
                    return await one_stream(s, url, chat("chat", max_tokens=24), headers,
                                            hang_s=60)

            task = asyncio.create_task(killer())
            results = await asyncio.gather(*(one(i) for i in range(300)))
            stop.set()
            await task
            counts = tally(results)
            lost = [r for r in results if r.kind() not in ("done", "mid_stream_error")]
            assert lost == [], lost[:3]
            assert counts["hung"] == 0
            assert kills >= 1
            failovers = cluster.metric_sum("rolemesh_dispatcher_failovers_total")
            FIGURES["kill_storm"] = {"requests": len(results), "kills": kills,
                                     "failovers": failovers,
                                     "mid_stream_errors": counts["mid_stream_error"],
                                     "done": counts["done"], "lost": len(lost)}
            print("battery kill storm:", FIGURES["kill_storm"])
            assert counts["mid_stream_error"] >= 1  # else the kills tested nothing
            assert failovers >= 1
            # Afterwards: a request per node (once its backoff, if any, is over) brings
            # every device back to ready.
            for node_id, agent in cluster.agents.items():
                async def answered(agent=agent) -> bool:
                    async with s.post(agent.url + "/v1/chat/completions",
                                      json=chat("chat", stream=False),
                                      headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                        assert resp.status in (200, 502, 503), resp.status
                        return resp.status == 200
                await wait_until(answered, timeout_s=30, interval_s=0.25,
                                 what=f"{node_id} answering again")
            await wait_until(lambda: all(serving_letters(cluster.inventory(n)["devices"][0])
                                         for n in cluster.agents),
                             timeout_s=20, what="every device's letters ready")
            await wait_until(lambda: len(cluster.live_llama_servers()) == len(cluster.agents),
                             timeout_s=20, what="one llama-server per device")
            await wait_until(lambda: dispatcher.num_fds() <= fds_before + 2, timeout_s=40,
                             what=f"dispatcher fds back to {fds_before}")


async def test_a_stream_that_stalls_ends_with_upstream_timeout_and_frees_the_device(
        tmp_path, tiny_models, fake_llama_server_bin):
    specs = [spec("node-a", tiny_models, tmp_path, **{"--fake-stall-after-tokens": 3})]
    with start_battery(tmp_path, fake_llama_server_bin, specs,
                       dispatcher_extra={"stream_idle_timeout_s": 1.0}) as cluster:
        async with aiohttp.ClientSession() as s:
            result = await one_stream(s, cluster.dispatcher.url, chat("chat"),
                                      cluster.headers(), hang_s=30)
            assert result.kind() == "mid_stream_error"
            assert b'"upstream_timeout"' in result.error_events[0]
            assert len(result.chunks) >= 3

            def free() -> bool:
                device = cluster.inventory("node-a")["devices"][0]
                node = cluster.nodes()["node-a"]["devices"][0]
                return device_load(device) == 0 and node["dispatcher_in_flight"] == 0
            await wait_until(free, timeout_s=20, what="the device's place given back")
            again = await one_stream(s, cluster.dispatcher.url, chat("chat"),
                                     cluster.headers(), hang_s=30)
            assert again.kind() == "mid_stream_error"  # served again: it was free


async def test_a_model_switch_under_load_lets_the_old_models_streams_finish(
        tmp_path, tiny_models, fake_llama_server_bin):
    record = tmp_path / "node-a-spawns.jsonl"
    models = [fake_models("letters", tiny_models["letters"], ["chat"], record,
                          **{"--fake-tokens-per-s": 60}),
              fake_models("digits", tiny_models["digits"], ["math"], record,
                          **{"--fake-tokens-per-s": 60})]
    specs = [AgentSpec("node-a", models, {"max_switch_wait_s": 5.0})]
    with start_battery(tmp_path, fake_llama_server_bin, specs) as cluster:
        url, headers = cluster.dispatcher.url, cluster.headers()
        async with aiohttp.ClientSession() as s:
            assert (await one_stream(s, url, chat("chat"), headers)).kind() == "done"
            old = [asyncio.create_task(one_stream(s, url, chat("chat", max_tokens=30),
                                                  headers)) for _ in range(4)]
            await wait_until(lambda: cluster.nodes()["node-a"]["devices"][0]
                             ["dispatcher_in_flight"] >= 1, what="old streams running")
            switch = await one_stream(s, url, chat("math", max_tokens=4), headers, hang_s=60)
            olds = await asyncio.gather(*old)
        assert [r.kind() for r in olds] == ["done"] * 4
        assert switch.kind() == "done"
        assert b"digits" in b"".join(switch.chunks)


async def test_a_crash_loop_backs_off_counts_restarts_and_answers_503_fast(
        tmp_path, tiny_models, fake_llama_server_bin):
    specs = [spec("node-a", tiny_models, tmp_path, **{"--fake-exit-at-start": 1})]
    with start_battery(tmp_path, fake_llama_server_bin, specs) as cluster:
        url, headers = cluster.dispatcher.url, cluster.headers()
        async with aiohttp.ClientSession() as s:
            first = [await one_stream(s, url, chat("chat"), headers, hang_s=30)
                     for _ in range(2)]
            assert all(r.status == 503 for r in first)
            spawned = len(cluster.spawns("node-a"))
            more = [await one_stream(s, url, chat("chat"), headers, hang_s=30)
                    for _ in range(3)]
            assert all(r.status == 503 for r in more)
            # Backing off: not one start per request.
            assert len(cluster.spawns("node-a")) - spawned < 3
        instances = [i for d in cluster.inventory("node-a")["devices"]
                     for i in d.get("instances", [])]
        assert instances
        assert instances[0]["restarts"] >= 1
