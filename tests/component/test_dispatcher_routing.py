"""Which device the dispatcher picks, what it says it would pick, and what it serves."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
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


async def post(s: aiohttp.ClientSession, url: str, body: dict[str, Any],
               **kw: Any) -> tuple[int, CIMultiDict[str], dict[str, Any]]:
    async with s.post(url + "/v1/chat/completions", json=body, **kw) as resp:
        return resp.status, resp.headers.copy(), await resp.json()


async def get_json(s: aiohttp.ClientSession, url: str) -> Any:
    async with s.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def content(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"])


async def test_a_request_goes_to_the_device_that_has_its_model_loaded():
    a = FakeAgent("node-a", [FakeDevice("gpu:0", loaded=["coder-7b"]),
                             FakeDevice("gpu:1")], MODELS)
    b = FakeAgent("node-b", [FakeDevice("gpu:0", loaded=["planner-7b"])], MODELS)
    async with running_agents(a, b), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        await b.register(s, d.url)
        status, headers, answer = await post(s, d.url, chat("planner"))
        assert status == 200
        assert content(answer) == "node-b/gpu:0/planner-7b"
        assert headers["X-RoleMesh-Routed-To"] == "node-b/gpu:0"
        assert b.seen[0].device == "gpu:0"
        assert b.seen[0].model_header == "planner-7b"
        status, _, answer = await post(s, d.url, chat("coder-7b"))
        assert content(answer) == "node-a/gpu:0/coder-7b"
        assert a.seen[-1].device == "gpu:0"


async def test_a_model_not_loaded_anywhere_goes_where_it_fits_best_leaving_big_rooms_free():
    a = FakeAgent("node-a", [FakeDevice("gpu:0", loaded=["coder-7b"]),
                             FakeDevice("gpu:1", memory_total_mb=12000)], MODELS)
    b = FakeAgent("node-b", [FakeDevice("gpu:0", memory_total_mb=48000)], MODELS)
    async with running_agents(a, b), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        await b.register(s, d.url)
        route = await get_json(s, d.url + "/v1/route?model=planner")
        # Room left after it: 6,800 MB on a/gpu:1, 13,600 beside coder-7b, 39,200 on b.
        assert route["action"] == "load_on_empty"
        assert (route["winner"]["node_id"], route["winner"]["device_id"]) == ("node-a", "gpu:1")
        reasons = {(c["node_id"], c["device_id"]): c["reason"] for c in route["candidates"]}
        assert reasons[("node-a", "gpu:0")] == "fits_beside"
        status, _, answer = await post(s, d.url, chat("planner"))
        assert status == 200
        assert content(answer) == "node-a/gpu:1/planner-7b"


async def test_a_model_that_fits_beside_an_idle_resident_loads_there_without_evicting():
    a = FakeAgent("node-a", [FakeDevice("gpu:0", loaded=["coder-7b"])], MODELS)
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        route = await get_json(s, d.url + "/v1/route?model=planner")
        assert (route["action"], route["winner"]["evicts"]) == ("load_beside", [])
        status, _headers, answer = await post(s, d.url, chat("planner"))
        assert (status, content(answer)) == (200, "node-a/gpu:0/planner-7b")
        route = await get_json(s, d.url + "/v1/route?model=coder")
        assert route["action"] == "use_loaded"  # the fake's headers: both resident now
        nodes = await get_json(s, d.url + "/v1/nodes")
        instances = nodes["data"][0]["devices"][0]["status"]["instances"]
        assert [(i["model_id"], i["state"]) for i in instances] == [
            ("coder-7b", "ready"), ("planner-7b", "ready")]


async def test_a_device_just_sent_a_model_is_not_sent_another_one_while_an_empty_one_waits():
    a = FakeAgent("node-a", [FakeDevice("gpu:0"), FakeDevice("gpu:1")], MODELS)
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)  # both empty: the view says so until an answer comes back
        d.state.registry.expect(("node-a", "gpu:0"), "planner-7b")
        route = await get_json(s, d.url + "/v1/route?model=coder")
        assert route["winner"]["device_id"] == "gpu:1"
        assert route["action"] == "load_on_empty"


async def test_route_explains_every_candidate_and_why_it_won_or_lost():
    a = FakeAgent("node-a", [FakeDevice("gpu:0", loaded=["planner-7b"]),
                             FakeDevice("gpu:1", memory_total_mb=2000),
                             FakeDevice("gpu:2", loaded=["coder-7b"], pending_limit=1,
                                        reported_in_flight=1)], MODELS)
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        route = await get_json(s, d.url + "/v1/route?model=planner")
        assert route["model"] == "planner"
        assert route["kind"] == "role"
        assert route["outcome"] == "routed"
        assert route["action"] == "use_loaded"
        assert route["error"] is None
        reasons = {c["device_id"]: (c["reason"], c["chosen"]) for c in route["candidates"]}
        assert reasons == {"gpu:0": ("model_loaded", True),
                           "gpu:1": ("does_not_fit", False),
                           "gpu:2": ("at_pending_limit", False)}
        assert "planner-7b on node-a/gpu:0" in route["explanation"]


async def test_route_for_an_unknown_name_says_what_a_request_would_get():
    a = FakeAgent("node-a", [FakeDevice("gpu:0")], MODELS)
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        route = await get_json(s, d.url + "/v1/route?model=nope")
        assert route["outcome"] == "no_candidates"
        assert route["error"]["status"] == 404
        assert route["error"]["code"] == "model_not_found"
        async with s.get(d.url + "/v1/route") as resp:
            assert resp.status == 400


async def test_models_lists_model_ids_roles_and_aliases_the_cluster_serves():
    a = FakeAgent("node-a", [FakeDevice("gpu:0")], MODELS)
    config = dispatcher_config(aliases={"planning": "planner", "code": "coder",
                                      "writing": "writer"})
    async with running_agents(a), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        listing = await get_json(s, d.url + "/v1/models")
        assert listing["data"] == []
        await a.register(s, d.url)
        listing = await get_json(s, d.url + "/v1/models")
        assert listing["object"] == "list"
        entries = {m["id"]: m for m in listing["data"]}
        assert set(entries) == {"planner-7b", "coder-7b", "planner", "coder", "planning",
                                "code"}
        assert entries["planner-7b"]["kind"] == "model"
        assert entries["planner-7b"]["roles"] == ["planner"]
        assert entries["planner"]["kind"] == "role"
        assert entries["planner"]["models"] == ["planner-7b"]
        assert entries["code"]["kind"] == "alias"
        assert entries["code"]["models"] == ["coder-7b"]
        assert all(m["object"] == "model" for m in listing["data"])


async def test_an_alias_reaches_the_agent_with_the_body_naming_the_model_it_stands_for():
    a = FakeAgent("node-a", [FakeDevice("gpu:0")], MODELS)
    config = dispatcher_config(aliases={"code": "coder"})
    async with running_agents(a), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        status, _, answer = await post(s, d.url, chat("code"))
        assert status == 200
        assert content(answer) == "node-a/gpu:0/coder-7b"
        # the client's body, but `model` names the model that answers (it echoes it back)
        assert a.seen[0].body == {**chat("code"), "model": "coder-7b"}
        assert answer["model"] == "coder-7b"
        assert a.seen[0].model_header == "coder-7b"


async def test_an_unknown_model_gets_404_naming_it_and_what_the_cluster_serves():
    a = FakeAgent("node-a", [FakeDevice("gpu:0")], MODELS)
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        status, _, body = await post(s, d.url, chat("writer"))
        assert status == 404
        assert body["error"]["code"] == "model_not_found"
        assert "'writer'" in body["error"]["message"]
        assert "planner" in body["error"]["message"]
        assert a.seen == []


async def test_a_model_too_big_for_every_device_gets_422_naming_its_need_and_the_largest():
    a = FakeAgent("node-a", [FakeDevice("gpu:0", memory_total_mb=16000),
                             FakeDevice("gpu:1", memory_total_mb=24000)],
                  [FakeModel("huge-70b", ["planner"], memory_need_mb=40000)])
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        status, _, body = await post(s, d.url, chat("planner"))
        assert status == 422
        assert body["error"]["code"] == "model_does_not_fit"
        assert "40000 MB" in body["error"]["message"]
        assert "24000 MB" in body["error"]["message"]
        assert a.seen == []


async def test_every_device_at_its_pending_limit_gets_503_with_retry_after():
    a = FakeAgent("node-a", [FakeDevice("gpu:0", loaded=["planner-7b"], pending_limit=2,
                                        reported_in_flight=2)], MODELS)
    config = dispatcher_config(busy_retry_after_s=3)
    async with running_agents(a), running_dispatcher(config) as d, \
            aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        status, headers, body = await post(s, d.url, chat("planner"))
        assert status == 503
        assert headers["Retry-After"] == "3"
        assert body["error"]["code"] == "device_busy"
        assert a.seen == []


async def test_every_node_down_gets_503_with_retry_after():
    a = FakeAgent("node-a", [FakeDevice("gpu:0", loaded=["planner-7b"])], MODELS)
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        d.state.registry.mark_down("node-a", why="test")
        status, headers, body = await post(s, d.url, chat("planner"))
        assert status == 503
        assert "Retry-After" in headers
        assert body["error"]["code"] == "no_node_available"


async def test_requests_in_flight_count_against_the_device_until_they_finish():
    a = FakeAgent("node-a", [FakeDevice("gpu:0", loaded=["planner-7b"], pending_limit=1),
                             FakeDevice("gpu:1", loaded=["planner-7b"], pending_limit=1)],
                  MODELS)
    async with running_agents(a), running_dispatcher() as d, aiohttp.ClientSession() as s:
        await a.register(s, d.url)
        a.knobs.hold = asyncio.Event()
        first = asyncio.create_task(post(s, d.url, chat("planner")))
        second = asyncio.create_task(post(s, d.url, chat("planner")))
        await wait_until(lambda: len(a.seen) == 2, what="both requests at the agent")
        assert {x.device for x in a.seen} == {"gpu:0", "gpu:1"}
        nodes = await get_json(s, d.url + "/v1/nodes")
        assert [dev["dispatcher_in_flight"] for dev in nodes["data"][0]["devices"]] == [1, 1]
        status, _, _ = await post(s, d.url, chat("planner"))
        assert status == 503
        a.knobs.hold.set()
        assert (await first)[0] == 200
        assert (await second)[0] == 200
        nodes = await get_json(s, d.url + "/v1/nodes")
        assert [dev["dispatcher_in_flight"] for dev in nodes["data"][0]["devices"]] == [0, 0]
        status, _, _ = await post(s, d.url, chat("planner"))
        assert status == 200


async def test_the_operators_load_weight_decides_when_a_queue_is_worth_another_copy():
    # coder-7b runs on gpu:0 with two requests ahead (2 x 10 s); gpu:1 is empty and a load
    # takes 6 s. At the default weight a load counts 4 x 6 = 24 s: the request waits for
    # the copy it has. An operator whose loads are cheap sets load_weight 2 (12 s): the
    # same queue is now worth a second copy.
    models = [FakeModel("coder-7b", ["coder"], last_load_s=6.0)]

    def agent() -> FakeAgent:
        return FakeAgent("node-a", [FakeDevice("gpu:0", loaded=["coder-7b"], pending_limit=4,
                                               reported_in_flight=2),
                                    FakeDevice("gpu:1")], models)

    for config, device, action, load_s in (
            (dispatcher_config(), "gpu:0", "use_loaded", 24.0),
            (dispatcher_config(cost_model={"load_weight": 2}), "gpu:1", "load_on_empty", 12.0)):
        a = agent()
        async with running_agents(a), running_dispatcher(config) as d, \
                aiohttp.ClientSession() as s:
            await a.register(s, d.url)
            route = await get_json(s, d.url + "/v1/route?model=coder")
            assert (route["winner"]["device_id"], route["action"]) == (device, action)
            empty = next(c for c in route["candidates"] if c["device_id"] == "gpu:1")
            assert empty["load_s"] == load_s
            status, _, answer = await post(s, d.url, chat("coder"))
            assert status == 200
            assert content(answer) == f"node-a/{device}/coder-7b"
