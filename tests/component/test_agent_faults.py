"""The node agent under faults: full queues, crashes, slow loads, bad input, gone clients."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from node_agent.pidfiles import PidFiles, process_start_ticks
from tests.agent_harness import agent_config, chat, post_chat, running_agent
from tests.waiting import wait_until


def one_model(tiny: dict[str, Path], **extra: object) -> list[dict[str, object]]:
    return [{"model_id": "letters-1", "path": str(tiny["letters"]), "roles": ["chat"], **extra}]


def alive(pid: int) -> bool:
    return process_start_ticks(pid) is not None and not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


async def test_third_request_gets_503_at_once_when_pending_limit_is_2(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = one_model(tiny_models, server_args={"--fake-tokens-per-s": 20})
    config = agent_config(tmp_path, models, max_pending_requests_per_device=2)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        await post_chat(s, agent.url, "chat")  # loaded
        slow = [asyncio.create_task(post_chat(s, agent.url, "chat", max_tokens=30))
                for _ in range(2)]
        await wait_until(lambda: sum(agent.queue()) == 2, what="two admitted")
        status, headers, body = await post_chat(s, agent.url, "chat")
        assert status == 503
        assert body["error"]["code"] == "device_busy"
        assert int(headers["Retry-After"]) >= 1
        assert headers["X-RoleMesh-In-Flight"] == "1"
        assert headers["X-RoleMesh-Pending"] == "1"
        assert all(r[0] == 200 for r in await asyncio.gather(*slow))
        status, _, _ = await post_chat(s, agent.url, "chat")
        assert status == 200


async def test_a_crash_is_noticed_at_once_fails_its_request_and_the_next_request_restarts(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = one_model(tiny_models, server_args={"--fake-crash-after": 1})
    config = agent_config(tmp_path, models)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        assert (await post_chat(s, agent.url, "chat"))[0] == 200
        status, _, body = await post_chat(s, agent.url, "chat")  # the child dies serving it
        assert status == 502
        assert body["error"]["code"] == "upstream_failed"
        await wait_until(lambda: agent.instance("letters-1") is None, what="crash noticed")
        (crashed,) = agent.started
        assert "exited with code 3" in (crashed.last_error or "")
        assert agent.stops() == [("letters-1", "crash", "exit code 3")]
        status, _, _ = await post_chat(s, agent.url, "chat")
        assert status == 200
        crashed, restarted = agent.started
        assert [st.value for st in crashed.history] == [
            "empty", "starting", "ready", "failed", "empty"]
        assert [st.value for st in restarted.history] == ["empty", "starting", "ready"]
        assert restarted.restarts == 1
        async with s.get(agent.url + "/v1/node/inventory") as resp:
            inv = await resp.json()
        assert inv["recent_stops"][0]["reason"] == "crash"
        assert inv["devices"][0]["instances"][0]["restarts"] == 1


async def test_a_crash_mid_stream_ends_the_stream_with_an_error_event(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = one_model(tiny_models, server_args={"--fake-crash-after": 0,
                                                 "--fake-tokens-per-s": 50})
    config = agent_config(tmp_path, models)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        async with s.post(agent.url + "/v1/chat/completions",
                          json=chat("chat", stream=True, max_tokens=10)) as resp:
            raw = await resp.read()
        events = [e for e in raw.split(b"\n\n") if e.strip()]
        last = json.loads(events[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == "upstream_crashed"  # its llama-server died


async def test_a_model_that_is_never_ready_gets_503_model_not_ready_after_the_timeout(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = one_model(tiny_models, server_args={"--fake-never-ready": True})
    config = agent_config(tmp_path, models, llama_server_startup_timeout_s=0.5)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        status, headers, body = await post_chat(s, agent.url, "chat")
        assert status == 503
        assert body["error"]["code"] == "model_not_ready"
        assert "not ready within 0.5s" in body["error"]["message"]
        assert "Retry-After" in headers
        (failed,) = agent.started
        assert failed.history[-2:] == ["failed", "empty"]
        # Marked failed on the device with a backoff: the next request is not a new load.
        assert "letters-1" in agent.scheduler.failed_models("gpu:0")
        status, headers, _ = await post_chat(s, agent.url, "chat")
        assert status == 503
        assert "Retry-After" in headers
        assert len(agent.started) == 1
        async with s.get(agent.url + "/v1/route", params={"model": "chat"}) as resp:
            (candidate,) = (await resp.json())["candidates"]
        assert (candidate["reason"], candidate["recently_failed"]) == ("recently_failed", True)


async def test_a_model_that_cannot_load_fails_fast_with_its_exit_code_and_output(
        tmp_path, tiny_models, fake_llama_server_bin):
    record = tmp_path / "spawns.jsonl"
    models = one_model(tiny_models, server_args={"--fake-exit-at-start": 7,
                                                 "--fake-record": str(record)})
    config = agent_config(tmp_path, models, llama_server_startup_timeout_s=60)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        started = time.monotonic()
        status, _, body = await post_chat(s, agent.url, "chat")
        assert status == 503
        assert body["error"]["code"] == "model_not_ready"
        assert "exited with code 7" in body["error"]["message"]
        assert time.monotonic() - started < 30  # not the 60 s startup timeout
        assert len(record.read_text().splitlines()) == 3  # retried with backoff
        assert len(agent.started) == 1  # by one instance


async def test_a_client_that_disconnects_frees_its_place_and_cancels_upstream(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = one_model(tiny_models, server_args={"--fake-tokens-per-s": 5})
    config = agent_config(tmp_path, models)
    async with running_agent(config, fake_llama_server_bin) as agent:
        async with aiohttp.ClientSession() as s, s.post(
                agent.url + "/v1/chat/completions",
                json=chat("chat", stream=True, max_tokens=100)) as resp:
            await resp.content.readuntil(b"\n\n")
            assert agent.queue() == (1, 0)
        await wait_until(lambda: agent.queue() == (0, 0), timeout_s=5,
                         what="the place freed")
        async with aiohttp.ClientSession() as s:
            assert (await post_chat(s, agent.url, "chat"))[0] == 200


async def test_a_queued_client_that_disconnects_gives_back_its_place(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = one_model(tiny_models, server_args={"--fake-tokens-per-s": 10})
    config = agent_config(tmp_path, models, max_pending_requests_per_device=2)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        busy = asyncio.create_task(post_chat(s, agent.url, "chat", max_tokens=20))
        await wait_until(lambda: agent.queue() == (1, 0), what="in flight")
        async with aiohttp.ClientSession() as other:
            queued = asyncio.create_task(post_chat(other, agent.url, "chat"))
            await wait_until(lambda: agent.queue() == (1, 1), what="queued")
            queued.cancel()
        await wait_until(lambda: agent.queue()[1] == 0, what="place back")
        assert (await busy)[0] == 200


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b'{"messages": []}', 400, "missing_model"),
    (b'[1, 2]', 400, "invalid_request"),
    (b'{"model": 5}', 400, "invalid_request"),
    (b'{"model": "no-such-role"}', 404, "model_not_found"),
    (b'{"model": "chat", "stream": "yes"}', 400, "invalid_request"),
], ids=["malformed json", "missing model", "not an object", "model not a string",
        "unknown role", "stream not a bool"])
async def test_bad_input_gets_an_openai_error_and_disturbs_nothing(
        tmp_path, tiny_models, fake_llama_server_bin, body, status, code):
    config = agent_config(tmp_path, one_model(tiny_models))
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        async with s.post(agent.url + "/v1/chat/completions", data=body,
                          headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == status
            err = (await resp.json())["error"]
            assert err["code"] == code
            assert err["message"]
            assert err["type"] == "invalid_request_error"
        assert (await post_chat(s, agent.url, "chat"))[0] == 200


async def test_a_body_over_the_limit_gets_413(tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, one_model(tiny_models), max_body_bytes=2048)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        big = json.dumps({"model": "chat", "prompt": "x" * 5000}).encode()
        async with s.post(agent.url + "/v1/completions", data=big) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "body_too_large"
        assert agent.residents() == {}
        assert agent.loads() == []


async def test_the_cluster_token_is_required_when_configured(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, one_model(tiny_models), cluster_token="s3cret")
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        status, _, body = await post_chat(s, agent.url, "chat")
        assert status == 401
        assert body["error"]["code"] == "invalid_token"
        async with s.get(agent.url + "/health") as resp:
            assert resp.status == 200
        status, _, _ = await post_chat(s, agent.url, "chat",
                                       headers={"Authorization": "Bearer s3cret"})
        assert status == 200


async def test_requests_for_the_loaded_model_go_before_a_switch(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = [
        {"model_id": "letters-1", "path": str(tiny_models["letters"]), "roles": ["a"],
         "server_args": {"--fake-tokens-per-s": 40}},
        {"model_id": "digits-1", "path": str(tiny_models["digits"]), "roles": ["b"],
         "server_args": {"--fake-tokens-per-s": 40}},
    ]
    # One model at a time: this is about the switch (co-resident, they would not switch).
    config = agent_config(tmp_path, models, max_pending_requests_per_device=4,
                          co_residency=False)
    finished: list[str] = []

    async def ask(s: aiohttp.ClientSession, role: str) -> None:
        status, _, _ = await post_chat(s, agent.url, role, max_tokens=8)
        assert status == 200
        finished.append(role)

    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        await ask(s, "a")
        finished.clear()
        first = asyncio.create_task(ask(s, "a"))
        await wait_until(lambda: agent.queue() == (1, 0), what="in flight")
        wants_b = asyncio.create_task(ask(s, "b"))
        await wait_until(lambda: agent.queue() == (1, 1), what="b queued")
        more_a = asyncio.create_task(ask(s, "a"))
        await asyncio.gather(first, wants_b, more_a)
        assert finished == ["a", "a", "b"]
        assert agent.loads() == ["letters-1", "digits-1"]  # one switch, no ping-pong
        assert agent.stops() == [("letters-1", "evicted_for", "digits-1")]


async def test_no_llama_server_survives_the_agent_and_orphans_are_reaped_at_start(
        tmp_path, tiny_models, fake_llama_server_bin):
    record = tmp_path / "spawns.jsonl"
    config = agent_config(tmp_path, one_model(tiny_models,
                                              server_args={"--fake-record": str(record)}))
    # An orphan from an "earlier run": a fake llama-server recorded in our pid file.
    orphan = subprocess.Popen([str(fake_llama_server_bin), "--port", "0"],
                              start_new_session=True)
    PidFiles(config.state_dir, config.node_id).write("gpu:0", orphan.pid)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        assert orphan.wait(timeout=10) is not None
        await post_chat(s, agent.url, "chat")
        child = json.loads(record.read_text().splitlines()[-1])["pid"]
        assert alive(child)
    await wait_until(lambda: not alive(child), timeout_s=5, what="child gone")
    assert not list((config.state_dir / "pids").glob("*.pid"))
    assert os.path.isdir(config.state_dir)


async def test_a_switch_is_held_back_only_for_max_switch_wait_s_under_steady_load(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = [
        {"model_id": "letters-1", "path": str(tiny_models["letters"]), "roles": ["a"],
         "server_args": {"--fake-tokens-per-s": 40}},
        {"model_id": "digits-1", "path": str(tiny_models["digits"]), "roles": ["b"]},
    ]
    config = agent_config(tmp_path, models, max_pending_requests_per_device=3,
                          max_switch_wait_s=0.3, co_residency=False)
    finished: list[str] = []

    async def ask(s: aiohttp.ClientSession, role: str) -> None:
        status, _, _ = await post_chat(s, agent.url, role, max_tokens=8)  # ~0.2 s for "a"
        assert status == 200
        finished.append(role)

    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        # "b" once first: the patience is never shorter than the waiting model's load time,
        # which is assumed long (seconds) until it has been measured.
        await ask(s, "b")
        await ask(s, "a")
        finished.clear()
        steady = [asyncio.create_task(ask(s, "a")) for _ in range(2)]
        await wait_until(lambda: agent.queue()[1] == 1, what="a queued")
        wants_b = asyncio.create_task(ask(s, "b"))
        # Keep the loaded model busy: a new "a" joins whenever one finishes.
        for _ in range(8):
            done_before = len(finished)
            await wait_until(lambda n=done_before: len(finished) > n, what="progress")
            if "b" in finished:
                break
            steady.append(asyncio.create_task(ask(s, "a")))
        await asyncio.gather(wants_b, *steady)
    assert "b" in finished[:-1]  # served while "a" still had work, not after all of it
    assert agent.loads() == ["digits-1", "letters-1", "digits-1", "letters-1"]  # b, a, b, a


async def test_a_slow_load_is_noticed_when_llama_server_says_it_loaded_not_a_poll_later(
        tmp_path, tiny_models, fake_llama_server_bin):
    # Probes back off 5, 10, 20 … ms: a 2.6 s load would be polled next at ~5.1 s, past
    # the 4 s startup timeout. The "model loaded" line makes the agent probe at once.
    models = one_model(tiny_models, server_args={"--fake-load-delay-s": 2.6})
    config = agent_config(tmp_path, models, llama_server_probe_interval_s=30,
                          llama_server_startup_timeout_s=4)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        status, _, body = await post_chat(s, agent.url, "chat")
        assert status == 200, body


async def test_a_request_that_waits_its_whole_queue_timeout_gets_504_queue_timeout(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = one_model(tiny_models, server_args={"--fake-tokens-per-s": 10})
    config = agent_config(tmp_path, models, max_pending_requests_per_device=2,
                          request_timeout_s=0.5)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        # Streamed, so the 0.5 s upstream silence limit never cuts the busy request.
        busy = asyncio.create_task(post_chat(s, agent.url, "chat", stream=True, max_tokens=20))
        await wait_until(lambda: agent.queue() == (1, 0), what="in flight")
        status, headers, body = await post_chat(s, agent.url, "chat")
        assert status == 504
        assert body["error"]["code"] == "queue_timeout"
        assert "0.5s" in body["error"]["message"]
        assert headers["X-RoleMesh-Pending"] == "0"  # it gave its place back
        assert (await busy)[0] == 200


async def test_two_co_resident_models_serve_at_once_without_waiting_for_each_other(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = [
        {"model_id": "letters-1", "path": str(tiny_models["letters"]), "roles": ["a"],
         "server_args": {"--fake-tokens-per-s": 10}},
        {"model_id": "digits-1", "path": str(tiny_models["digits"]), "roles": ["b"]},
    ]
    config = agent_config(tmp_path, models, max_pending_requests_per_device=4)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        await post_chat(s, agent.url, "a")
        slow = asyncio.create_task(post_chat(s, agent.url, "a", stream=True, max_tokens=30))
        await wait_until(lambda: agent.queue() == (1, 0), what="a in flight")
        status, headers, _ = await post_chat(s, agent.url, "b")  # while "a" streams
        assert status == 200
        assert headers["X-RoleMesh-In-Flight"] == "1"  # "a" still running beside it
        assert not slow.done()
        assert (await slow)[0] == 200
        assert agent.loads() == ["letters-1", "digits-1"]
        assert agent.stops() == []
