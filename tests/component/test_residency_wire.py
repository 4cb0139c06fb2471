"""Wire schema 2 between agent and dispatcher: a version mismatch is a clear error."""

from __future__ import annotations

import json

import aiohttp

from tests.fakes.fake_agent import dispatcher_config, running_dispatcher

V1_INVENTORY = {"schema_version": 1, "node_id": "old", "url": "http://127.0.0.1:9",
                "backend": "cuda", "seq": 1, "models": [],
                "devices": [{"device_id": "gpu:0", "name": "GPU", "backend": "cuda",
                             "memory_total_mb": 24000, "memory_used_mb": 0,
                             "memory_free_mb": 24000, "slot_state": "ready",
                             "loaded_model": "x"}]}


async def test_an_agent_speaking_schema_1_is_refused_by_version_not_by_its_fields():
    async with running_dispatcher(dispatcher_config()) as d, aiohttp.ClientSession() as s:
        async with s.post(d.url + "/v1/nodes/register",
                          data=json.dumps({"inventory": V1_INVENTORY})) as resp:
            body = await resp.json()
        assert resp.status == 400
        assert "schema_version 1 is not supported" in body["error"]["message"]
        assert "speaks 2" in body["error"]["message"]
        beat = {"schema_version": 1, "node_id": "old", "seq": 2, "devices": []}
        async with s.post(d.url + "/v1/nodes/heartbeat", data=json.dumps(beat)) as resp:
            body = await resp.json()
        assert resp.status == 400
        assert "schema_version 1" in body["error"]["message"]
        async with s.get(d.url + "/v1/nodes") as resp:
            assert (await resp.json())["data"] == []


async def test_non_finite_numbers_are_refused_on_the_wire():
    inventory = {**V1_INVENTORY, "schema_version": 2, "devices": [
        {"device_id": "gpu:0", "name": "GPU", "backend": "cuda", "memory_total_mb": 24000,
         "memory_used_mb": 0, "memory_free_mb": 24000, "utilization_pct": float("nan")}]}
    async with running_dispatcher(dispatcher_config()) as d, aiohttp.ClientSession() as s:
        async with s.post(d.url + "/v1/nodes/register",
                          data=json.dumps({"inventory": inventory})) as resp:
            assert resp.status == 400
        async with s.get(d.url + "/v1/nodes") as resp:
            assert (await resp.json())["data"] == []
