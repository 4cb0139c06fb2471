"""The agent with the fake llama-server as real processes: a pinned model comes back after its
llama-server is killed, and a streamed request that waits for a load hears about it."""

from __future__ import annotations

import os
import signal

import aiohttp

from tests.agent_harness import agent_config, chat, running_agent
from tests.waiting import wait_until


async def test_a_pinned_model_is_loaded_at_start_and_comes_back_after_it_is_killed(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, [
        {"model_id": "embed", "path": str(tiny_models["letters"]), "roles": ["embeddings"],
         "pinned": True},
        {"model_id": "chat", "path": str(tiny_models["digits"]), "roles": ["talk"]}])
    async with running_agent(config, fake_llama_server_bin) as agent:
        await wait_until(lambda: agent.residents() == {"embed": "ready"}, what="pinned loaded")
        first = agent.instance("embed")
        assert first is not None
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        await wait_until(lambda: (i := agent.instance("embed")) is not None
                         and i is not first and i.state.value == "ready", what="restarted")
        (status,) = [i for i in agent.node.device_status("gpu:0").instances
                     if i.model_id == "embed"]
        assert status.restarts == 1
        assert status.pinned
        assert ("embed", "crash", "exit code -9") in agent.stops()
        # Started at start-up, then again by itself after the kill: nobody had to ask.
        assert [i.model_id for i in agent.started] == ["embed", "embed"]


async def test_a_stream_that_waits_for_a_load_gets_loading_comments_then_its_answer(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, [
        {"model_id": "slow", "path": str(tiny_models["letters"]), "roles": ["chat"],
         "server_args": {"--fake-load-delay-s": 2.6}}])
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        async with s.post(agent.url + "/v1/chat/completions",
                          json=chat("chat", stream=True)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            body = (await resp.read()).decode()
        lines = [line for line in body.splitlines() if line]
        assert lines[0].startswith(": loading slow, ")  # before any data
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert len(data) > 2
        assert not any('"error"' in line for line in data)


async def test_a_model_too_big_for_every_device_is_a_422_naming_the_usable_memory(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, [{"model_id": "huge", "path": str(tiny_models["letters"]),
                                      "roles": ["chat"], "memory_mb": 20_000}])
    async with running_agent(config, fake_llama_server_bin, gpus_mb=[8000]) as agent, \
            aiohttp.ClientSession() as s:
        async with s.post(agent.url + "/v1/chat/completions", json=chat("chat")) as resp:
            body = await resp.json()
        assert resp.status == 422
        assert body["error"]["code"] == "model_does_not_fit"
        assert "20000 MB" in body["error"]["message"]
        assert "7200 MB usable after the 0.9 safety margin" in body["error"]["message"]
        assert agent.started == []  # nothing was loaded for it
