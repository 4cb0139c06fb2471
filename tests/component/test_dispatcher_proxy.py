"""Forwarding through the dispatcher: failover, streaming, request ids, bad requests, keys."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

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

MODELS = [FakeModel("planner-7b", ["planner"]), FakeModel("coder-7b", ["coder"])]
TOKEN = "cluster-token-123"


def loaded(node_id: str, model: str = "planner-7b", **kw: Any) -> FakeAgent:
    return FakeAgent(node_id, [FakeDevice("gpu:0", loaded=[model] if model else [])], MODELS, **kw)


def empty(node_id: str, **kw: Any) -> FakeAgent:
    return FakeAgent(node_id, [FakeDevice("gpu:0")], MODELS, **kw)


async def post(s: aiohttp.ClientSession, url: str, body: Any, path: str = "/v1/chat/completions",
               **kw: Any) -> tuple[int, CIMultiDict[str], Any]:
    async with s.post(url + path, json=body, **kw) as resp:
        return resp.status, resp.headers.copy(), await resp.json(content_type=None)


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


async def metric(s: aiohttp.ClientSession, url: str, line_start: str) -> float:
    async with s.get(url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_busy_agent_makes_the_request_fail_over_to_the_next_candidate():
    a, b = loaded("node-a"), empty("node-b")
    async with running_agents(a, b), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        await b.register(s, d.url)
        a.knobs.busy = True
        status, headers, answer = await post(s, d.url, chat("planner"))
        assert status == 200
        assert answer["choices"][0]["message"]["content"] == "node-b/gpu:0/planner-7b"
        assert headers["X-RoleMesh-Routed-To"] == "node-b/gpu:0"
        assert len(a.seen) == 1
        assert len(b.seen) == 1
        assert await metric(s, d.url, 'rolemesh_dispatcher_failovers_total{reason="device_busy"}'
                            ) == 1


async def test_a_model_not_ready_in_time_fails_over_too():
    a, b = loaded("node-a"), empty("node-b")
    async with running_agents(a, b), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        await b.register(s, d.url)
        a.knobs.not_ready = True
        status, _, answer = await post(s, d.url, chat("planner"))
        assert status == 200
        assert answer["choices"][0]["message"]["content"].startswith("node-b/")


async def test_a_refused_connection_fails_over_and_marks_the_node_down():
    a, b = loaded("node-a"), empty("node-b")
    async with running_agents(b), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.start()
        await a.stop()  # a's port now refuses connections
        await a.register(s, d.url)
        await b.register(s, d.url)
        status, _, answer = await post(s, d.url, chat("planner"))
        assert status == 200
        assert answer["choices"][0]["message"]["content"] == "node-b/gpu:0/planner-7b"
        async with s.get(d.url + "/v1/nodes/node-a") as resp:
            assert (await resp.json())["state"] == "down"
        assert await a.heartbeat(s, d.url) == 200  # a heartbeat makes it routable again
        async with s.get(d.url + "/v1/nodes/node-a") as resp:
            assert (await resp.json())["state"] == "up"


async def test_a_connection_dropped_before_the_answer_fails_over():
    a, b = loaded("node-a"), empty("node-b")
    async with running_agents(a, b), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        await b.register(s, d.url)
        a.knobs.drop_before_answer = True
        status, _, answer = await post(s, d.url, chat("planner"))
        assert status == 200
        assert answer["choices"][0]["message"]["content"].startswith("node-b/")


async def test_every_candidate_busy_gets_503_with_the_agents_retry_after():
    a, b = loaded("node-a"), empty("node-b")
    async with running_agents(a, b), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        await b.register(s, d.url)
        a.knobs.busy = b.knobs.busy = True
        b.knobs.retry_after_s = 7
        status, headers, body = await post(s, d.url, chat("planner"))
        assert status == 503
        assert headers["Retry-After"] == "7"
        assert body["error"]["code"] == "device_busy"
        assert "node-a/gpu:0" in body["error"]["message"]
        assert "node-b/gpu:0" in body["error"]["message"]


async def test_failover_tries_at_most_max_attempts_devices():
    agents = [loaded(f"node-{i}") for i in range(4)]
    async with running_agents(*agents), \
            running_dispatcher(dispatcher_config(max_attempts=2)) as d, \
            aiohttp.ClientSession() as s:
        for agent in agents:
            await agent.register(s, d.url)
            agent.knobs.busy = True
        status, _, _ = await post(s, d.url, chat("planner"))
        assert status == 503
        assert sum(len(agent.seen) for agent in agents) == 2


async def test_an_unreachable_only_candidate_gets_503():
    a = loaded("node-a")
    a.url = "http://127.0.0.1:9"  # discard port: nothing listens
    async with running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        status, headers, body = await post(s, d.url, chat("planner"))
        assert status == 503
        assert body["error"]["code"] == "no_node_available"
        assert "Retry-After" in headers


async def test_streamed_chunks_reach_the_client_before_the_agent_has_finished():
    a = loaded("node-a")
    a.knobs.stream_gate = asyncio.Event()
    a.knobs.stream_chunks = 3
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        async with s.post(d.url + "/v1/chat/completions",
                          json=chat("planner", stream=True)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["X-RoleMesh-Routed-To"] == "node-a/gpu:0"
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"data: ")
            assert b"node-a/gpu:0/planner-7b#0" in first
            # The agent is still waiting on the gate: nothing else has been written yet.
            assert not a.knobs.stream_gate.is_set()
            assert a.devices["gpu:0"].in_flight == 1
            assert d.state.registry.own_in_flight(("node-a", "gpu:0")) == 1
            a.knobs.stream_gate.set()
            rest = await resp.content.read()
        all_events = events(first + rest)
        assert len(all_events) == 4
        assert all_events[-1] == b"data: [DONE]"
        assert d.state.registry.own_in_flight(("node-a", "gpu:0")) == 0


async def test_a_stream_broken_after_the_first_byte_ends_with_an_sse_error_event():
    a, b = loaded("node-a"), loaded("node-b")
    a.knobs.stream_chunks = 5
    a.knobs.die_after_chunks = 2
    async with running_agents(a, b), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        async with s.post(d.url + "/v1/chat/completions",
                          json=chat("planner", stream=True)) as resp:
            assert resp.status == 200
            raw = await resp.content.read()
        got = events(raw)
        assert len(got) == 3
        assert b"#1" in got[1]
        assert got[-1].startswith(b"data: ")
        error = json.loads(got[-1][len(b"data: "):])
        assert error["error"]["code"] == "upstream_failed"
        await b.register(s, d.url)
        assert b.seen == []  # no retry once bytes went out
        assert await metric(
            s, d.url, 'rolemesh_dispatcher_requests_total{model="planner",outcome="stream_broken"}'
        ) == 1


async def test_the_request_id_goes_to_the_agent_and_back_to_the_client():
    a = loaded("node-a")
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        _, headers, _ = await post(s, d.url, chat("planner"), headers={"X-Request-Id": "req-42"})
        assert a.seen[0].request_id == "req-42"
        assert headers["X-Request-Id"] == "req-42"
        _, headers, _ = await post(s, d.url, chat("planner"))
        assert a.seen[1].request_id
        assert headers["X-Request-Id"] == a.seen[1].request_id
        async with s.post(d.url + "/v1/chat/completions", json=chat("planner", stream=True),
                          headers={"X-Request-Id": "req-43"}) as resp:
            await resp.read()
            assert resp.headers["X-Request-Id"] == "req-43"
        assert a.seen[2].request_id == "req-43"


async def test_the_agent_gets_the_cluster_token_never_the_clients_key():
    a = loaded("node-a", cluster_token=TOKEN)
    config = dispatcher_config(cluster_token=TOKEN, api_keys=["client-key"])
    async with running_agents(a), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        await a.register(s, d.url, token=TOKEN)
        status, _, body = await post(s, d.url, chat("planner"))
        assert status == 401
        assert body["error"]["code"] == "invalid_token"
        status, _, _ = await post(s, d.url, chat("planner"),
                                  headers={"Authorization": "Bearer wrong"})
        assert status == 401
        assert a.seen == []
        status, _, _ = await post(s, d.url, chat("planner"),
                                  headers={"Authorization": "Bearer client-key"})
        assert status == 200
        assert a.seen[0].authorization == f"Bearer {TOKEN}"
        async with s.get(d.url + "/v1/models") as resp:
            assert resp.status == 401
        async with s.get(d.url + "/v1/models",
                         headers={"Authorization": "Bearer client-key"}) as resp:
            assert resp.status == 200


async def test_without_api_keys_clients_need_none_and_their_authorization_is_not_forwarded():
    a = loaded("node-a")
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        status, _, _ = await post(s, d.url, chat("planner"),
                                  headers={"Authorization": "Bearer sk-client"})
        assert status == 200
        assert a.seen[0].authorization is None


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b'{"messages": []}', 400, "missing_model"),
    (b'{"model": "planner", "stream": "yes"}', 400, "invalid_request"),
    (b"[1, 2]", 400, "invalid_request"),
])
async def test_a_bad_body_gets_an_openai_shaped_400(body, status, code):
    async with running_dispatcher() as d, aiohttp.ClientSession() as s, \
            s.post(d.url + "/v1/chat/completions", data=body,
                   headers={"Content-Type": "application/json"}) as resp:
        answer = await resp.json()
        assert resp.status == status
        assert answer["error"]["code"] == code
        assert answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["message"]


async def test_a_body_over_max_body_bytes_gets_413():
    config = dispatcher_config(max_body_bytes=2048)
    big = {"model": "planner", "messages": [{"role": "user", "content": "x" * 4000}]}
    async with running_dispatcher(config) as d, aiohttp.ClientSession() as s:
        status, _, answer = await post(s, d.url, big)
        assert status == 413
        assert answer["error"]["code"] == "body_too_large"


async def test_completions_and_embeddings_are_forwarded_to_the_same_path():
    a = loaded("node-a")
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        for path in ("/v1/completions", "/v1/embeddings"):
            status, _, _ = await post(s, d.url, {"model": "planner", "input": "hi"}, path=path)
            assert status == 200
        assert [x.path for x in a.seen] == ["/v1/completions", "/v1/embeddings"]


async def test_an_agent_error_is_passed_on_as_it_was():
    a = loaded("node-a")
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        a.models.pop("planner-7b")  # the agent no longer serves what it reported
        status, headers, body = await post(s, d.url, chat("planner"))
        assert status == 404
        assert body["error"]["code"] == "model_not_found"
        assert headers["X-RoleMesh-Routed-To"] == "node-a/gpu:0"


async def test_the_openai_sdk_gets_answers_and_streams_through_the_dispatcher():
    a = loaded("node-a")
    async with running_agents(a), running_dispatcher() as d:
        async with aiohttp.ClientSession() as s:
            await a.register(s, d.url)
        client = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0)
        try:
            answer = await client.chat.completions.create(
                model="planner", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content == "node-a/gpu:0/planner-7b"
            stream = await client.chat.completions.create(
                model="planner", messages=[{"role": "user", "content": "hi"}], stream=True)
            parts = [chunk.choices[0].delta.content async for chunk in stream]
            assert parts == [f"node-a/gpu:0/planner-7b#{i} " for i in range(3)]
            models = await client.models.list()
            assert {m.id for m in models.data} >= {"planner", "planner-7b"}
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(
                    model="nope", messages=[{"role": "user", "content": "hi"}])
        finally:
            await client.close()


async def test_a_client_that_goes_away_mid_stream_frees_its_place_on_the_device():
    a = loaded("node-a")
    a.knobs.stream_gate = asyncio.Event()
    async with running_agents(a), running_dispatcher() as d:
        async with aiohttp.ClientSession() as s:
            await a.register(s, d.url)
            async with s.post(d.url + "/v1/chat/completions",
                              json=chat("planner", stream=True)) as resp:
                await resp.content.readuntil(b"\n\n")
                assert d.state.registry.own_in_flight(("node-a", "gpu:0")) == 1
        # The client session is closed: the dispatcher notices and lets go.
        await wait_until(lambda: d.state.registry.own_in_flight(("node-a", "gpu:0")) == 0,
                         what="the dispatcher's count to drop")
        a.knobs.stream_gate.set()
        assert metric_of(d, 'rolemesh_dispatcher_requests_total{model="planner",'
                            'outcome="client_gone"}') == 1


async def test_metrics_count_requests_by_model_and_outcome_and_decisions_by_action():
    a = loaded("node-a")
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        await post(s, d.url, chat("planner"))
        await post(s, d.url, chat("planner"))
        await post(s, d.url, chat("no-such-model"))
        await post(s, d.url, chat("coder"))  # coder-7b: loaded nowhere, fits beside planner
        async with s.get(d.url + "/metrics") as resp:
            text = await resp.text()
    assert 'rolemesh_dispatcher_requests_total{model="planner",outcome="ok"} 2.0' in text
    assert 'rolemesh_dispatcher_requests_total{model="-",outcome="model_not_found"} 1.0' in text
    assert 'rolemesh_dispatcher_decisions_total{action="use_loaded"} 2.0' in text
    assert 'rolemesh_dispatcher_decisions_total{action="load_beside"} 1.0' in text
    assert 'rolemesh_dispatcher_in_flight_total 0.0' in text
    assert 'rolemesh_dispatcher_device_queue{device="gpu:0",node="node-a"} 0.0' in text


def metric_of(d: Any, line_start: str) -> float:
    for line in d.state.metrics.render().decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
