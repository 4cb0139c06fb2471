"""The dispatcher's registry endpoints against fake agents: auth, heartbeats, expiry, inventory."""

from __future__ import annotations

import aiohttp

from dispatcher.app import Deps
from tests.fakes.fake_agent import (
    FakeAgent,
    FakeDevice,
    FakeModel,
    dispatcher_config,
    running_dispatcher,
)
from tests.waiting import wait_until

TOKEN = "s3cret-cluster-token"


def agent(node_id: str = "node-a", **kw: object) -> FakeAgent:
    return FakeAgent(node_id, [FakeDevice("gpu:0", loaded=["planner-7b"]),
                               FakeDevice("gpu:1", memory_total_mb=12000)],
                     [FakeModel("planner-7b", ["planner"]), FakeModel("coder-7b", ["coder"])],
                     **kw)  # type: ignore[arg-type]


async def get_json(s: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with s.get(url) as resp:
        return resp.status, await resp.json()


async def test_register_and_heartbeat_without_the_cluster_token_get_401():
    fake = agent()
    fake.url = "http://127.0.0.1:9"
    async with running_dispatcher(dispatcher_config(cluster_token=TOKEN)) as d, \
            aiohttp.ClientSession() as s:
        assert await fake.register(s, d.url) == 401
        assert await fake.register(s, d.url, token="wrong") == 401
        assert await fake.heartbeat(s, d.url) == 401
        async with s.post(d.url + "/v1/nodes/register", data=b"{}") as resp:
            body = await resp.json()
            assert resp.status == 401
            assert body["error"]["code"] == "invalid_token"
        _, nodes = await get_json(s, d.url + "/v1/nodes")
        assert nodes["data"] == []
        assert await fake.register(s, d.url, token=TOKEN) == 200
        assert await fake.heartbeat(s, d.url, token=TOKEN) == 200


async def test_the_cluster_token_comes_from_the_environment_when_the_config_has_none(
        monkeypatch):
    monkeypatch.setenv("ROLEMESH_CLUSTER_TOKEN", TOKEN)
    fake = agent()
    fake.url = "http://127.0.0.1:9"
    async with running_dispatcher() as d, aiohttp.ClientSession() as s:
        assert await fake.register(s, d.url) == 401
        assert await fake.register(s, d.url, token=TOKEN) == 200


async def test_heartbeat_of_an_unknown_node_gets_404_so_the_agent_registers_again():
    fake = agent()
    fake.url = "http://127.0.0.1:9"
    async with running_dispatcher() as d, aiohttp.ClientSession() as s:
        async with s.post(d.url + "/v1/nodes/heartbeat",
                          data=fake.heartbeat_request().model_dump_json()) as resp:
            body = await resp.json()
        assert resp.status == 404
        assert body["error"]["code"] == "node_not_found"
        assert await fake.register(s, d.url) == 200
        assert await fake.heartbeat(s, d.url) == 200


async def test_an_older_heartbeat_is_answered_but_not_applied():
    fake = agent()
    fake.url = "http://127.0.0.1:9"
    async with running_dispatcher() as d, aiohttp.ClientSession() as s:
        await fake.register(s, d.url)
        fake.devices["gpu:0"].loaded = []
        async with s.post(d.url + "/v1/nodes/heartbeat",
                          data=fake.heartbeat_request(seq=0).model_dump_json()) as resp:
            assert resp.status == 200
            assert (await resp.json())["accepted"] is False
        _, node = await get_json(s, d.url + "/v1/nodes/node-a")
        assert [i["model_id"] for i in node["devices"][0]["status"]["instances"]] == [
            "planner-7b"]


async def test_a_registration_that_is_not_an_inventory_gets_400():
    async with running_dispatcher() as d, aiohttp.ClientSession() as s:
        async with s.post(d.url + "/v1/nodes/register", data=b"{not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_json"
        async with s.post(d.url + "/v1/nodes/register",
                          json={"inventory": {"node_id": "x"}}) as resp:
            body = await resp.json()
            assert resp.status == 400
            assert "inventory.url" in body["error"]["message"]
        fake = agent()
        fake.url = "file:///etc/passwd"
        assert await fake.register(s, d.url) == 400


async def test_nodes_lists_each_device_with_memory_model_state_and_queue():
    fake = agent()
    fake.url = "http://127.0.0.1:9"
    async with running_dispatcher(dispatcher_config(heartbeat_interval_s=2.0)) as d, \
            aiohttp.ClientSession() as s:
        async with s.post(d.url + "/v1/nodes/register",
                          data=f'{{"inventory": {fake.inventory().model_dump_json()}}}') as r:
            assert r.status == 200
            assert await r.json() == {"node_id": "node-a", "heartbeat_interval_s": 2.0}
        status, nodes = await get_json(s, d.url + "/v1/nodes")
        assert status == 200
        [node] = nodes["data"]
        assert node["node_id"] == "node-a"
        assert node["state"] == "up"
        assert node["url"] == "http://127.0.0.1:9"
        assert node["last_heartbeat_age_s"] >= 0
        gpu0, gpu1 = node["devices"]
        [planner] = gpu0["status"]["instances"]
        assert (planner["model_id"], planner["state"]) == ("planner-7b", "ready")
        assert planner["memory_charged_mb"] == gpu0["status"]["memory_charged_mb"] == 4000
        assert gpu0["status"]["memory_total_mb"] == 24000
        assert gpu0["status"]["memory_free_mb"] == 20000
        assert gpu0["status"]["in_flight"] == 0
        assert gpu0["dispatcher_in_flight"] == 0
        assert gpu1["status"]["instances"] == []
        assert [m["model_id"] for m in node["models"]] == ["planner-7b", "coder-7b"]
        status, one = await get_json(s, d.url + "/v1/nodes/node-a")
        assert status == 200
        ages = ("last_heartbeat_age_s", "registered_age_s")
        assert {k: v for k, v in one.items() if k not in ages} == \
            {k: v for k, v in node.items() if k not in ages}
        status, missing = await get_json(s, d.url + "/v1/nodes/node-z")
        assert status == 404
        assert missing["error"]["code"] == "node_not_found"


async def test_a_silent_node_goes_down_then_comes_back_with_one_heartbeat():
    fake = agent()
    fake.url = "http://127.0.0.1:9"
    config = dispatcher_config(heartbeat_interval_s=0.05, node_timeout_s=0.2,
                               node_forget_s=600)
    async with running_dispatcher(config, Deps(expiry_interval_s=0.02)) as d, \
            aiohttp.ClientSession() as s:
        await fake.register(s, d.url)

        async def state() -> str:
            _, node = await get_json(s, d.url + "/v1/nodes/node-a")
            return str(node["state"])

        async def is_down() -> bool:
            return await state() == "down"

        await wait_until(is_down, what="node-a marked down")
        _, route = await get_json(s, d.url + "/v1/route?model=planner")
        assert route["outcome"] == "all_down"
        assert {c["reason"] for c in route["candidates"]} == {"node_down"}
        assert await fake.heartbeat(s, d.url) == 200
        assert await state() == "up"
        _, route = await get_json(s, d.url + "/v1/route?model=planner")
        assert route["outcome"] == "routed"


async def test_a_node_silent_for_longer_is_forgotten_and_must_register_again():
    fake = agent()
    fake.url = "http://127.0.0.1:9"
    config = dispatcher_config(heartbeat_interval_s=0.02, node_timeout_s=0.05,
                               node_forget_s=0.1)
    async with running_dispatcher(config, Deps(expiry_interval_s=0.01)) as d, \
            aiohttp.ClientSession() as s:
        await fake.register(s, d.url)

        async def gone() -> bool:
            status, _ = await get_json(s, d.url + "/v1/nodes/node-a")
            return status == 404

        await wait_until(gone, what="node-a forgotten")
        assert await fake.heartbeat(s, d.url) == 404
        assert await fake.register(s, d.url) == 200


async def test_health_and_metrics_need_no_credentials():
    config = dispatcher_config(cluster_token=TOKEN, api_keys=["client-key"])
    fake = agent()
    fake.url = "http://127.0.0.1:9"
    async with running_dispatcher(config) as d, aiohttp.ClientSession() as s:
        await fake.register(s, d.url, token=TOKEN)
        status, health = await get_json(s, d.url + "/health")
        assert status == 200
        assert health == {"status": "ok", "nodes_up": 1, "nodes_down": 0}
        async with s.get(d.url + "/metrics") as resp:
            text = await resp.text()
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
        assert 'rolemesh_dispatcher_nodes{state="up"} 1.0' in text
        assert "rolemesh_dispatcher_registrations_total 1.0" in text
        assert TOKEN not in text
