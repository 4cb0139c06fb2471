"""The dispatcher's fault behaviour against fake agents: failover cases, bounds, refusals."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import aiohttp
import pytest

from tests.fakes.fake_agent import (
    FakeAgent,
    FakeDevice,
    FakeModel,
    chat,
    dispatcher_config,
    running_agents,
    running_dispatcher,
)
from tests.fakes.fault_proxy import FaultProxy
from tests.waiting import wait_until

MODELS = [FakeModel("planner-7b", ["planner"])]


def loaded(node_id: str) -> FakeAgent:
    return FakeAgent(node_id, [FakeDevice("gpu:0", loaded=["planner-7b"])], MODELS)


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


def metric(d: Any, line_start: str) -> float:
    for line in d.state.metrics.render().decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def post(s: aiohttp.ClientSession, url: str, body: Any, **kw: Any
               ) -> tuple[int, Any]:
    async with s.post(url + "/v1/chat/completions", json=body, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_an_agent_502_before_the_first_byte_fails_over_and_is_counted():
    a, b = loaded("node-a"), loaded("node-b")
    async with running_agents(a, b), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        await b.register(s, d.url)
        a.knobs.bad_gateway = True
        b.knobs.bad_gateway = True
        status, body = await post(s, d.url, chat("planner"))
        assert status == 503  # both failed before a byte: a 503 to retry, not a 502
        assert body["error"]["code"] == "no_node_available"
        assert len(a.seen) == len(b.seen) == 1  # never twice to the same device
        assert metric(d, 'rolemesh_dispatcher_failovers_total{reason="upstream_failed"}') == 2
        b.knobs.bad_gateway = False
        status, body = await post(s, d.url, chat("planner"))
        assert status == 200
        assert body["choices"][0]["message"]["content"].startswith("node-b/")


async def test_a_silent_agent_fails_over_after_the_first_byte_bound_and_is_then_avoided():
    a, b = loaded("node-a"), loaded("node-b")
    config = dispatcher_config(first_byte_timeout_s=0.3)
    async with running_agents(a, b), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        await b.register(s, d.url)
        hold = a.knobs.hold = asyncio.Event()  # a accepts and never sends headers
        b.knobs.hold = None
        answered = []
        for _ in range(4):
            async with s.post(d.url + "/v1/chat/completions",
                              json=chat("planner", stream=True)) as resp:
                assert resp.status == 200
                answered.append(resp.headers["X-RoleMesh-Routed-To"])
                assert events(await resp.read())[-1] == b"data: [DONE]"
        assert set(answered) == {"node-b/gpu:0"}
        # At most one request waited on node-a: after it, node-a was suspect.
        assert len(a.seen) <= 1
        assert metric(d, 'rolemesh_dispatcher_failovers_total{reason="first_byte_timeout"}') \
            == len(a.seen)
        assert d.state.forwarder.avoiding()["suspects"] == (["node-a"] if a.seen else [])
        hold.set()
        await a.heartbeat(s, d.url)  # a heartbeat after the suspicion clears it
        assert d.state.forwarder.avoiding()["suspects"] == []


async def test_a_stream_that_stalls_ends_with_one_upstream_timeout_event_and_frees_the_place():
    a = loaded("node-a")
    a.knobs.stream_gate = asyncio.Event()  # after the first chunk, nothing more
    config = dispatcher_config(stream_idle_timeout_s=0.3)
    async with running_agents(a), running_dispatcher(config) as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        async with s.post(d.url + "/v1/chat/completions",
                          json=chat("planner", stream=True)) as resp:
            raw = await resp.read()
        got = events(raw)
        assert len(got) == 2
        assert b"#0" in got[0]
        error = json.loads(got[-1][len(b"data: "):])
        assert error["error"]["code"] == "upstream_timeout"
        assert b"[DONE]" not in raw
        assert d.state.registry.own_in_flight(("node-a", "gpu:0")) == 0
        await wait_until(lambda: a.devices["gpu:0"].in_flight == 0, what="agent freed")
        assert metric(d, 'rolemesh_dispatcher_requests_total{model="planner",'
                         'outcome="stream_broken"}') == 1


async def test_a_stream_the_agent_ends_with_an_error_event_counts_as_broken():
    a = loaded("node-a")
    a.knobs.stream_chunks = 4
    a.knobs.error_event_after_chunks = 2
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        async with s.post(d.url + "/v1/chat/completions",
                          json=chat("planner", stream=True)) as resp:
            got = events(await resp.read())
        assert len(got) == 3
        assert json.loads(got[-1][len(b"data: "):])["error"]["code"] == "upstream_failed"
        assert metric(d, 'rolemesh_dispatcher_requests_total{model="planner",'
                         'outcome="stream_broken"}') == 1
        assert metric(d, 'rolemesh_dispatcher_requests_total{model="planner",'
                         'outcome="ok"}') == 0


async def test_a_device_failing_three_times_in_a_row_is_cooled_unless_it_is_the_last():
    a, b = loaded("node-a"), loaded("node-b")
    config = dispatcher_config(cooldown_after_failures=3, cooldown_s=60)
    async with running_agents(a, b), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        await b.register(s, d.url)
        a.knobs.stream_chunks = b.knobs.stream_chunks = 3
        a.knobs.die_after_chunks = b.knobs.die_after_chunks = 1  # both break mid-stream
        for _ in range(8):
            async with s.post(d.url + "/v1/chat/completions",
                              json=chat("planner", stream=True)) as resp:
                await resp.read()
        cooling = d.state.forwarder.avoiding()["cooldowns"]
        assert set(cooling) <= {"node-a/gpu:0", "node-b/gpu:0"}
        assert cooling  # at least one is cooling
        assert metric(d, "rolemesh_dispatcher_cooldowns_total") >= 1
        for path in ("/v1/nodes", "/v1/route?model=planner"):  # operators see them
            async with s.get(d.url + path) as resp:
                assert set((await resp.json())["avoiding"]["cooldowns"]) == set(cooling)
        # Both cooled or not, requests still go somewhere: a cool-down never leaves none.
        a.knobs.die_after_chunks = b.knobs.die_after_chunks = None
        status, _ = await post(s, d.url, chat("planner"))
        assert status == 200


@pytest.mark.parametrize(("url", "node_id", "why"), [
    ("http://169.254.169.254/latest", "node-x", "metadata"),
    ("http://[fd00:ec2::254]:80", "node-x", "metadata"),
    ("http://metadata.google.internal/", "node-x", "metadata"),
    ("http://user:pass@127.0.0.1:9/", "node-x", "user:password"),
    ("http://127.0.0.1:9/a b", "node-x", "spaces"),
    ("http://127.0.0.1:9", "", "empty"),
])
async def test_registration_refuses_metadata_credentialed_and_malformed_urls(url, node_id, why):
    agent = loaded("node-x")
    agent.node_id = node_id
    agent.url = url
    async with running_dispatcher() as d, aiohttp.ClientSession() as s:
        status = await agent.register(s, d.url)
        assert status == 400
        async with s.get(d.url + "/v1/nodes") as resp:
            assert (await resp.json())["data"] == []


async def test_registration_of_a_metadata_url_is_accepted_when_the_config_allows_it():
    agent = loaded("node-x")
    agent.url = "http://user:pass@169.254.10.10:80"
    async with running_dispatcher(dispatcher_config(allow_unsafe_node_urls=True)) as d, \
            aiohttp.ClientSession() as s:
        assert await agent.register(s, d.url) == 200


async def test_a_registration_with_nan_is_refused_and_the_inventory_stays_json():
    agent = loaded("node-a")
    async with running_agents(agent), running_dispatcher() as d, aiohttp.ClientSession() as s:
        body = json.loads(agent.inventory().model_dump_json())
        body["devices"][0]["utilization_pct"] = float("nan")
        payload = json.dumps({"inventory": body})  # json.dumps writes NaN
        assert "NaN" in payload
        async with s.post(d.url + "/v1/nodes/register", data=payload,
                          headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with s.get(d.url + "/v1/nodes") as resp:
            json.loads(await resp.text(), parse_constant=pytest.fail)


DEEP = b'{"model": "planner", "x": ' + b"[" * 10000 + b"]" * 10000 + b"}"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions",
                                  "/v1/embeddings"])
@pytest.mark.parametrize(("body", "extra", "status"), [
    (DEEP, {}, 400),
    (b"this is not gzip", {"Content-Encoding": "gzip"}, 400),
    (gzip.compress(b'{"model": 7}'), {"Content-Encoding": "gzip"}, 400),
], ids=["nested-10000-deep", "gzip-that-is-not", "gzip-model-not-a-string"])
async def test_hostile_bodies_get_an_openai_shaped_4xx(path, body, extra, status):
    async with running_dispatcher() as d, aiohttp.ClientSession() as s, \
            s.post(d.url + path, data=body,
                   headers={"Content-Type": "application/json", **extra}) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "code"}


async def test_a_non_ascii_authorization_header_gets_401_not_500():
    config = dispatcher_config(api_keys=["sk-good"], cluster_token="tok")
    async with running_dispatcher(config) as d:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(d.url.rsplit(":", 1)[1]))
        for path in ("/v1/models", "/v1/nodes/register"):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode()
                         + b"Authorization: Bearer sk-\xff\xfe\xe9t\r\n\r\n")
            await writer.drain()
            status_line = await reader.readline()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            body = json.loads(await reader.readexactly(length))
            assert status_line.split()[1] in (b"401", b"405")
            assert set(body["error"]) == {"message", "type", "code"}
        writer.close()


async def test_a_non_streamed_request_to_a_black_holed_agent_fails_over_once_health_is_silent():
    a = loaded("node-a")  # holds the model: chosen first
    b = FakeAgent("node-b", [FakeDevice("gpu:0")], MODELS)
    config = dispatcher_config(first_byte_timeout_s=0.3, connect_timeout_s=0.5)
    async with running_agents(a, b), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        proxy = FaultProxy(int(a.url.rsplit(":", 1)[1])).start()
        try:
            a.url = proxy.url  # the dispatcher reaches node-a only through the proxy
            await a.register(s, d.url)
            await b.register(s, d.url)
            proxy.set("blackhole")  # requests and /health alike: a frozen host
            status, body = await post(s, d.url, chat("planner"))
            assert status == 200
            assert body["choices"][0]["message"]["content"].startswith("node-b/")
        finally:
            proxy.stop()
        assert metric(d, 'rolemesh_dispatcher_failovers_total{reason="first_byte_timeout"}') \
            == 1


async def test_a_non_streamed_request_to_a_live_but_slow_agent_is_not_given_up_on():
    a, b = loaded("node-a"), loaded("node-b")
    config = dispatcher_config(first_byte_timeout_s=0.2)
    async with running_agents(a, b), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        hold = a.knobs.hold = asyncio.Event()  # a long generation: /health still answers
        slow = asyncio.create_task(post(s, d.url, chat("planner")))
        await wait_until(lambda: len(a.seen) == 1, what="node-a got it")
        await asyncio.sleep(1.0)  # several first-byte bounds pass (not a timing assertion)
        assert not slow.done()
        hold.set()
        status, body = await slow
        assert status == 200
        assert body["choices"][0]["message"]["content"].startswith("node-a/")
        assert metric(d, 'rolemesh_dispatcher_failovers_total{reason="first_byte_timeout"}') \
            == 0
        assert b.seen == []
