"""The agent's side of the reliability contract: stale upstream connections, gone clients,
hostile input, secrets kept from llama-server."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest

from tests.agent_harness import agent_config, chat, running_agent
from tests.waiting import wait_until

TOKEN = "agent-canary-token-7f3a"


def one_model(tiny: dict[str, Path], **server_args: object) -> list[dict[str, object]]:
    return [{"model_id": "letters-1", "path": str(tiny["letters"]), "roles": ["chat"],
             "server_args": server_args}]


async def stream_once(s: aiohttp.ClientSession, url: str, max_tokens: int = 6) -> bytes:
    async with s.post(url + "/v1/chat/completions",
                      json=chat("chat", stream=True, max_tokens=max_tokens)) as resp:
        body = await resp.read()
        assert resp.status == 200, body
        return body


async def test_no_stream_is_lost_to_a_llama_server_that_closes_after_each_answer(
        tmp_path, tiny_models, fake_llama_server_bin):
    # The real llama-server build closes the connection after a streamed answer while its
    # headers say keep-alive: a pooled connection is then dead when the next request takes it.
    models = one_model(tiny_models, **{"--fake-close-after-stream": True,
                                       "--fake-tokens-per-s": 2000})
    config = agent_config(tmp_path, models, max_pending_requests_per_device=64)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        await stream_once(s, agent.url)
        gate = asyncio.Semaphore(8)

        async def one() -> bytes:
            async with gate:
                return await stream_once(s, agent.url)

        bodies = await asyncio.gather(*(one() for _ in range(200)))
        assert all(b.rstrip().endswith(b"data: [DONE]") for b in bodies)
        assert all(b'"error"' not in b for b in bodies)


async def test_a_client_that_leaves_mid_stream_is_logged_as_gone_without_a_traceback(
        tmp_path, tiny_models, fake_llama_server_bin, caplog, capsys):
    models = one_model(tiny_models, **{"--fake-tokens-per-s": 20})
    config = agent_config(tmp_path, models)
    caplog.set_level(logging.DEBUG)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(agent.url + "/v1/chat/completions",
                              json=chat("chat", stream=True, max_tokens=200)) as resp:
                await resp.content.readuntil(b"\n\n")
                resp.close()  # leave with the stream half-way
        await wait_until(lambda: agent.queue() == (0, 0), what="freed")
        await stream_once(s, agent.url)  # and the device serves the next one
    out = capsys.readouterr()
    logged = out.out + out.err + caplog.text
    assert "Error handling request" not in logged
    assert "Traceback" not in logged
    done = [line for line in logged.splitlines() if "request.done" in line]
    assert sum("status=499" in line for line in done) == 3
    assert not any("status=500" in line for line in done)


DEEP = b'{"model": "chat", "x": ' + b"[" * 10000 + b"]" * 10000 + b"}"


@pytest.mark.parametrize(("body", "extra", "status"), [
    (DEEP, {}, 400),
    (b"not gzip at all", {"Content-Encoding": "gzip"}, 400),
], ids=["nested-10000-deep", "gzip-that-is-not"])
async def test_hostile_bodies_get_a_4xx_in_the_openai_shape(
        tmp_path, tiny_models, fake_llama_server_bin, body, extra, status):
    config = agent_config(tmp_path, one_model(tiny_models))
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            async with s.post(agent.url + path, data=body,
                              headers={"Content-Type": "application/json", **extra}) as resp:
                assert resp.status == status
                assert set((await resp.json())["error"]) == {"message", "type", "code"}


async def test_a_non_ascii_bearer_token_gets_401_not_500(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, one_model(tiny_models), cluster_token=TOKEN)
    async with running_agent(config, fake_llama_server_bin) as agent:
        reader, writer = await asyncio.open_connection("127.0.0.1", config.listen_port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer \xff\xfe-\xe9\xe9\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        assert status_line.split()[1] == b"401"
        writer.close()
        assert agent.url


async def test_llama_server_never_sees_the_cluster_token_from_the_environment(
        tmp_path, tiny_models, fake_llama_server_bin, monkeypatch):
    record = tmp_path / "spawns.jsonl"
    monkeypatch.setenv("ROLEMESH_CLUSTER_TOKEN", TOKEN)
    monkeypatch.setenv("ROLEMESH_API_KEY", "sk-canary-key")
    monkeypatch.setenv("FAKE_LLAMA_CANARY", "kept")
    config = agent_config(tmp_path, one_model(tiny_models, **{"--fake-record": str(record)}))
    assert config.cluster_token == TOKEN  # it did come from the environment
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s, \
            s.post(agent.url + "/v1/chat/completions", json=chat("chat"),
                   headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 200
    spawn = json.loads(record.read_text().splitlines()[0])
    environ = Path(f"/proc/{spawn['pid']}/environ")
    assert spawn["env"]["FAKE_LLAMA_CANARY"] == "kept"  # the record sees the environment
    assert TOKEN not in json.dumps(spawn)
    assert not environ.exists() or TOKEN.encode() not in environ.read_bytes()
