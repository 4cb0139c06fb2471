"""The node agent serving requests through a fake llama-server: the happy paths."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from rolemesh.api import NodeInventory
from tests.agent_harness import FakeGpuBackend, agent_config, chat, post_chat, running_agent
from tests.waiting import wait_until


def two_models(tiny: dict[str, Path], **extra: object) -> list[dict[str, object]]:
    return [
        {"model_id": "letters-1", "path": str(tiny["letters"]), "roles": ["planner", "chat"],
         **extra},
        {"model_id": "digits-1", "path": str(tiny["digits"]), "roles": ["coder"], **extra},
    ]


async def test_chat_completion_by_role_is_answered_by_the_model_with_that_role(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, two_models(tiny_models))
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        status, headers, body = await post_chat(s, agent.url, "coder")
        assert status == 200
        assert "digits" in body["choices"][0]["message"]["content"]
        assert headers["X-RoleMesh-Device"] == "gpu:0"
        assert headers["X-RoleMesh-Residents"] == "digits-1=ready"
        assert headers["X-RoleMesh-In-Flight"] == "0"
        assert headers["X-RoleMesh-Node"] == "node-a"


async def test_streamed_chunks_arrive_before_the_answer_is_finished(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = two_models(tiny_models, server_args={"--fake-tokens-per-s": 10})
    config = agent_config(tmp_path, models)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        async with s.post(agent.url + "/v1/chat/completions",
                          json=chat("planner", stream=True, max_tokens=20)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await resp.content.readuntil(b"\n\n")
            # At 10 tokens/s, 20 tokens take ~2 s; the first chunk is here long before.
            assert first.startswith(b"data: ")
            assert agent.queue() == (1, 0)
            letters = agent.instance("letters-1")
            assert letters is not None
            assert letters.in_flight == 1
            rest = await resp.content.read()
        events = [e for e in (first + rest).split(b"\n\n") if e.strip()]
        assert events[-1] == b"data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1])
        assert "letters" in text


async def test_two_models_that_fit_together_share_the_device_and_load_once_each(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, two_models(tiny_models))
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        answers = []
        for name in ("planner", "coder", "planner", "coder"):
            status, headers, body = await post_chat(s, agent.url, name)
            assert status == 200
            answers.append(body["choices"][0]["message"]["content"])
        assert ["letters" in a for a in answers] == [True, False, True, False]
        assert ["digits" in a for a in answers] == [False, True, False, True]
        assert headers["X-RoleMesh-Residents"] == "letters-1=ready,digits-1=ready"
        assert agent.loads() == ["letters-1", "digits-1"]  # alternating loads nothing more
        assert agent.stops() == []
        assert agent.residents() == {"letters-1": "ready", "digits-1": "ready"}


async def test_with_co_residency_off_requests_for_two_models_switch_the_device(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, two_models(tiny_models), co_residency=False)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        _, _, first = await post_chat(s, agent.url, "planner")
        letters = agent.instance("letters-1")
        _, headers, second = await post_chat(s, agent.url, "coder")
        assert "letters" in first["choices"][0]["message"]["content"]
        assert "digits" in second["choices"][0]["message"]["content"]
        assert headers["X-RoleMesh-Residents"] == "digits-1=ready"
        assert letters is not None
        assert [st.value for st in letters.history] == [
            "empty", "starting", "ready", "stopping", "empty"]
        assert agent.stops() == [("letters-1", "evicted_for", "digits-1")]
        assert agent.loads() == ["letters-1", "digits-1"]


async def test_a_model_that_fits_beside_an_idle_one_loads_there_keeping_the_other_gpu_free(
        tmp_path, tiny_models, fake_llama_server_bin):
    record = tmp_path / "spawns.jsonl"
    models = two_models(tiny_models, server_args={"--fake-record": str(record)})
    config = agent_config(tmp_path, models)
    async with running_agent(config, fake_llama_server_bin, gpus_mb=[8000, 8000]) as agent, \
            aiohttp.ClientSession() as s:
        hs = [(await post_chat(s, agent.url, name))[1] for name in ("planner", "coder", "planner")]
        assert len({h["X-RoleMesh-Device"] for h in hs}) == 1  # the best fit: one device
        spawns = [json.loads(line) for line in record.read_text().splitlines()]
        assert len(spawns) == 2  # one load per model, no eviction
        assert agent.residents("gpu:1") == {} or agent.residents("gpu:0") == {}


async def test_with_co_residency_off_a_second_empty_device_loads_the_other_model(
        tmp_path, tiny_models, fake_llama_server_bin):
    record = tmp_path / "spawns.jsonl"
    models = two_models(tiny_models, server_args={"--fake-record": str(record)})
    config = agent_config(tmp_path, models, co_residency=False)
    async with running_agent(config, fake_llama_server_bin, gpus_mb=[8000, 8000]) as agent, \
            aiohttp.ClientSession() as s:
        _, h1, _ = await post_chat(s, agent.url, "planner")
        _, h2, _ = await post_chat(s, agent.url, "coder")
        _, h3, _ = await post_chat(s, agent.url, "planner")
        assert {h1["X-RoleMesh-Device"], h2["X-RoleMesh-Device"]} == {"gpu:0", "gpu:1"}
        assert h3["X-RoleMesh-Device"] == h1["X-RoleMesh-Device"]
        spawns = [json.loads(line) for line in record.read_text().splitlines()]
        assert len(spawns) == 2  # one load per model, no eviction
        pins = sorted(sp["env"]["CUDA_VISIBLE_DEVICES"] for sp in spawns)
        assert pins == ["0", "1"]


async def test_the_device_named_by_the_dispatcher_is_used(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, two_models(tiny_models))
    async with running_agent(config, fake_llama_server_bin, gpus_mb=[8000, 8000]) as agent, \
            aiohttp.ClientSession() as s:
        status, headers, _ = await post_chat(s, agent.url, "planner",
                                             headers={"X-RoleMesh-Device": "gpu:1"})
        assert status == 200
        assert headers["X-RoleMesh-Device"] == "gpu:1"
        status, _, body = await post_chat(s, agent.url, "planner",
                                          headers={"X-RoleMesh-Device": "gpu:7"})
        assert status == 400
        assert body["error"]["code"] == "unknown_device"


async def test_models_and_inventory_describe_the_node(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, two_models(tiny_models))
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        await post_chat(s, agent.url, "chat")
        async with s.get(agent.url + "/v1/models") as resp:
            listed = await resp.json()
        ids = {m["id"]: m for m in listed["data"]}
        assert ids["letters-1"]["roles"] == ["planner", "chat"]
        assert ids["coder"]["kind"] == "role"
        assert ids["coder"]["models"] == ["digits-1"]
        async with s.get(agent.url + "/v1/node/inventory") as resp:
            inv = NodeInventory.model_validate(await resp.json())
        assert inv.node_id == "node-a"
        (device,) = inv.devices
        (letters,) = device.instances
        assert (letters.model_id, letters.state, letters.devices) == ("letters-1", "ready",
                                                                      ["gpu:0"])
        assert letters.memory_charged_mb == device.memory_charged_mb > 0
        assert letters.memory_source == "estimated"
        assert letters.last_load_s is not None
        assert letters.restarts == 0
        assert letters.idle_s is not None
        assert letters.ttl_left_s is None
        assert device.memory_total_mb == 8000
        assert inv.schema_version == 2
        assert not inv.draining
        by_id = {m.model_id: m for m in inv.models}
        assert by_id["letters-1"].memory_need_mb >= by_id["letters-1"].file_size_mb
        assert by_id["letters-1"].last_load_s is not None
        assert by_id["letters-1"].recent_requests == 1
        assert by_id["digits-1"].last_load_s is None


async def test_the_inventory_reports_how_long_a_request_holds_the_device_per_model(
        tmp_path, tiny_models, fake_llama_server_bin):
    # 20 tokens at 40 a second: each request holds the device about half a second.
    config = agent_config(tmp_path, two_models(
        tiny_models, server_args={"--fake-tokens-per-s": 40}))
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        loop = asyncio.get_running_loop()
        took = []
        for _ in range(3):  # the first one loads letters-1 (not counted: it waits for it)
            started = loop.time()
            status, _, _ = await post_chat(s, agent.url, "chat", max_tokens=20)
            took.append(loop.time() - started)
            assert status == 200
        async with s.get(agent.url + "/v1/node/inventory") as resp:
            inv = NodeInventory.model_validate(await resp.json())
        by_id = {m.model_id: m for m in inv.models}
        service = by_id["letters-1"].service_s
        assert service is not None
        # A request holds the device no longer than its client waited for it.
        assert 0 < service <= max(took)
        assert by_id["digits-1"].service_s is None  # never asked: the policy's default


async def test_the_agent_weighs_a_load_with_its_configured_cost_model(
        tmp_path, tiny_models, fake_llama_server_bin):
    # For requests sent to it directly the agent decides over its own devices, with the
    # weights in its config: /v1/route shows a load priced at load_weight x its seconds.
    loads = {}
    for weight in (None, 1.5):
        extra = {} if weight is None else {"cost_model": {"load_weight": weight}}
        config = agent_config(tmp_path / str(weight), two_models(tiny_models), **extra)
        async with running_agent(config, fake_llama_server_bin) as agent, \
                aiohttp.ClientSession() as s:
            async with s.get(agent.url + "/v1/route", params={"model": "coder"}) as resp:
                (candidate,) = (await resp.json())["candidates"]
            assert candidate["reason"] == "fits_empty_device"
            loads[weight] = candidate["load_s"]
    assert loads[None] > 0
    assert loads[None] / loads[1.5] == pytest.approx(4 / 1.5, rel=1e-3)  # default: 4


async def test_a_name_only_the_dispatcher_knows_is_served_by_the_model_it_resolved_to(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, two_models(tiny_models))
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        status, _, _ = await post_chat(s, agent.url, "planning")  # a dispatcher alias
        assert status == 404
        status, headers, _ = await post_chat(s, agent.url, "planning",
                                                headers={"X-RoleMesh-Model": "digits-1"})
        assert status == 200
        assert headers["X-RoleMesh-Residents"] == "digits-1=ready"


class FailingAfterStartBackend(FakeGpuBackend):
    """Reads fine at start, then the driver starts failing (an NVML hiccup)."""

    def __init__(self) -> None:
        super().__init__([8000])
        self.reads = 0

    def devices(self):
        self.reads += 1
        if self.reads > 2:
            raise RuntimeError("NVML: GPU is lost")
        return super().devices()


async def test_a_backend_that_stops_answering_does_not_fail_requests(
        tmp_path, tiny_models, fake_llama_server_bin, monkeypatch):
    monkeypatch.setattr("node_agent.node.FIGURES_TTL_S", 0.0)  # re-read on every request
    backend = FailingAfterStartBackend()
    config = agent_config(tmp_path, two_models(tiny_models))
    async with running_agent(config, fake_llama_server_bin, backend=backend) as agent, \
            aiohttp.ClientSession() as s:
        for _ in range(3):
            status, _, _ = await post_chat(s, agent.url, "chat")
            assert status == 200
        async with s.get(agent.url + "/v1/node/inventory") as resp:
            assert resp.status == 200
            assert (await resp.json())["devices"][0]["memory_total_mb"] == 8000
        assert backend.reads > 3


# -- the agent's own admin verbs and lifecycle ---------------------------------------------------

async def post_json(s: aiohttp.ClientSession, url: str, data: object = None
                    ) -> tuple[int, dict[str, object]]:
    async with s.post(url, json=data) as resp:
        return resp.status, await resp.json()


async def inventory_of(s: aiohttp.ClientSession, agent: object) -> NodeInventory:
    async with s.get(agent.url + "/v1/node/inventory") as resp:  # type: ignore[attr-defined]
        return NodeInventory.model_validate(await resp.json())


async def test_load_and_unload_through_the_agents_api(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, two_models(tiny_models))
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        status, body = await post_json(s, agent.url + "/v1/models/digits-1/load")
        assert status == 200, body
        assert (body["loaded"], body["model_id"], body["state"]) == (True, "digits-1", "ready")
        assert (await post_json(s, agent.url + "/v1/models/digits-1/load"))[0] == 200
        assert agent.loads() == ["digits-1"]  # loaded once: a second load is a no-op
        status, _, _answer = await post_chat(s, agent.url, "coder")
        assert status == 200
        assert agent.loads() == ["digits-1"]

        status, body = await post_json(s, agent.url + "/v1/models/ghost/load")
        assert (status, body["error"]["code"]) == (404, "model_not_found")
        status, body = await post_json(s, agent.url + "/v1/models/digits-1/load",
                                       {"device": "gpu:7"})
        assert (status, body["error"]["code"]) == (400, "unknown_device")

        status, body = await post_json(s, agent.url + "/v1/models/digits-1/unload")
        assert (status, body["unloaded"]) == (200, ["gpu:0"])
        assert agent.residents() == {}
        assert agent.stops() == [("digits-1", "unload", None)]
        inv = await inventory_of(s, agent)
        assert [(r.model_id, r.reason) for r in inv.recent_stops] == [("digits-1", "unload")]


async def test_an_unload_waits_for_the_request_in_flight_to_finish(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, two_models(tiny_models,
                                               server_args={"--fake-tokens-per-s": 20}))
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        slow = asyncio.create_task(post_chat(s, agent.url, "planner", stream=True,
                                             max_tokens=20))
        await wait_until(lambda: agent.queue() == (1, 0), what="in flight")
        unload = asyncio.create_task(post_json(s, agent.url + "/v1/models/letters-1/unload"))
        await wait_until(lambda: agent.residents() == {"letters-1": "draining"},
                         what="draining while it serves")
        status, _, streamed = await slow
        assert status == 200
        assert streamed.rstrip().endswith("data: [DONE]")
        assert (await unload) == (200, {"node_id": "node-a", "model": "letters-1",
                                        "unloaded": ["gpu:0"]})
        assert agent.stops() == [("letters-1", "unload", None)]


async def test_drain_refuses_new_requests_and_unloads_then_undrain_serves_again(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, two_models(tiny_models))
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        assert (await post_chat(s, agent.url, "planner"))[0] == 200
        assert await post_json(s, agent.url + "/v1/node/drain") == (
            200, {"node_id": "node-a", "draining": True})
        await wait_until(lambda: agent.residents() == {}, what="unloaded by the drain")
        assert agent.stops() == [("letters-1", "drain", None)]
        status, headers, body = await post_chat(s, agent.url, "planner")
        assert status == 503
        assert "Retry-After" in headers
        assert (await inventory_of(s, agent)).draining
        assert agent.loads() == ["letters-1"]  # the refused request loaded nothing

        assert (await post_json(s, agent.url + "/v1/node/undrain"))[0] == 200
        status, _, body = await post_chat(s, agent.url, "planner")
        assert status == 200
        assert "letters" in body["choices"][0]["message"]["content"]
        assert not (await inventory_of(s, agent)).draining


async def test_an_eviction_never_stops_an_instance_with_a_request_in_flight(
        tmp_path, tiny_models, fake_llama_server_bin):
    # 5,000 MB each on an 8,000 MB GPU (7,200 usable): they cannot share it.
    config = agent_config(tmp_path, two_models(tiny_models, memory_mb=5000,
                                               server_args={"--fake-tokens-per-s": 20}),
                          max_pending_requests_per_device=4)
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        slow = asyncio.create_task(post_chat(s, agent.url, "planner", stream=True,
                                             max_tokens=20))
        await wait_until(lambda: agent.queue() == (1, 0), what="letters serving")
        other = asyncio.create_task(post_chat(s, agent.url, "coder"))
        await wait_until(lambda: agent.queue() == (1, 1), what="coder waiting")
        assert agent.residents() == {"letters-1": "ready"}  # not stopped under its user
        status, _, streamed = await slow
        assert status == 200
        assert streamed.rstrip().endswith("data: [DONE]")
        status, _, body = await other
        assert status == 200
        assert "digits" in body["choices"][0]["message"]["content"]
        assert agent.stops() == [("letters-1", "evicted_for", "digits-1")]
        (stopped, _) = agent.started
        assert stopped.stopped_for is not None
        assert stopped.history[-2:] == ["stopping", "empty"]


async def test_a_device_group_runs_one_llama_server_charged_to_both_gpus_by_its_split(
        tmp_path, tiny_models, fake_llama_server_bin):
    record = tmp_path / "spawns.jsonl"
    models = [{"model_id": "big", "path": str(tiny_models["symbols"]), "roles": ["chat"],
               "devices": ["gpu:0", "gpu:1"], "tensor_split": [1, 3], "memory_mb": 4000,
               "server_args": {"--fake-record": str(record)}}]
    config = agent_config(tmp_path, models)
    async with running_agent(config, fake_llama_server_bin, gpus_mb=[8000, 8000]) as agent, \
            aiohttp.ClientSession() as s:
        status, headers, _ = await post_chat(s, agent.url, "chat")
        assert status == 200
        assert headers["X-RoleMesh-Device"] == "gpu:0+gpu:1"
        (spawn,) = [json.loads(line) for line in record.read_text().splitlines()]
        assert spawn["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
        inv = await inventory_of(s, agent)
        charged = {d.device_id: [(i.model_id, i.devices, i.memory_charged_mb)
                                 for i in d.instances] for d in inv.devices}
        assert charged == {"gpu:0": [("big", ["gpu:0", "gpu:1"], 1000)],
                           "gpu:1": [("big", ["gpu:0", "gpu:1"], 3000)]}
        assert [d.memory_charged_mb for d in inv.devices] == [1000, 3000]


async def test_a_pinned_model_loads_at_start_and_comes_back_after_its_server_is_killed(
        tmp_path, tiny_models, fake_llama_server_bin):
    record = tmp_path / "spawns.jsonl"
    models = [{"model_id": "embedder", "path": str(tiny_models["digits"]), "roles": ["embed"],
               "pinned": True, "server_args": {"--fake-record": str(record)}}]
    config = agent_config(tmp_path, models)
    async with running_agent(config, fake_llama_server_bin) as agent:
        await wait_until(lambda: agent.residents() == {"embedder": "ready"},
                         what="pinned loaded")
        (first,) = [json.loads(line) for line in record.read_text().splitlines()]
        os.kill(first["pid"], signal.SIGKILL)
        await wait_until(lambda: len(record.read_text().splitlines()) == 2
                         and agent.residents() == {"embedder": "ready"},
                         what="restarted without a request")
        assert agent.stops()[0][:2] == ("embedder", "crash")
        restarted = agent.instance("embedder")
        assert restarted is not None
        assert restarted.restarts == 1


async def test_a_device_held_for_a_set_stops_the_others_until_released(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, two_models(tiny_models),
                          sets={"both": ["letters-1", "digits-1"], "letters": ["letters-1"]})
    async with running_agent(config, fake_llama_server_bin) as agent, \
            aiohttp.ClientSession() as s:
        for name in ("planner", "coder"):
            assert (await post_chat(s, agent.url, name))[0] == 200
        assert agent.residents() == {"letters-1": "ready", "digits-1": "ready"}
        status, body = await post_json(s, agent.url + "/v1/node/mode",
                                       {"device": "gpu:0", "set": "nope"})
        assert (status, body["error"]["code"]) == (400, "invalid_request")
        assert await post_json(s, agent.url + "/v1/node/mode",
                               {"device": "gpu:0", "set": "letters"}) == (
            200, {"node_id": "node-a", "device": "gpu:0", "mode": "letters"})
        await wait_until(lambda: agent.residents() == {"letters-1": "ready"},
                         what="digits off the held device")
        assert ("digits-1", "mode", None) in agent.stops()
        assert (await inventory_of(s, agent)).devices[0].mode == "letters"
        assert (await post_chat(s, agent.url, "coder"))[0] == 503  # not while held
        assert (await post_json(s, agent.url + "/v1/node/mode",
                                {"device": "gpu:0", "set": "auto"}))[1]["mode"] == "auto"
        status, _, body = await post_chat(s, agent.url, "coder")
        assert status == 200
        assert "digits" in body["choices"][0]["message"]["content"]
