"""The node agent serving requests through a fake llama-server: the happy paths."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from rolemesh.api import NodeInventory
from tests.agent_harness import FakeGpuBackend, agent_config, chat, post_chat, running_agent


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
            assert letters is not None and letters.in_flight == 1
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
        assert letters.last_load_s is not None and letters.restarts == 0
        assert letters.idle_s is not None and letters.ttl_left_s is None  # no TTL set
        assert device.memory_total_mb == 8000
        assert inv.schema_version == 2 and not inv.draining
        by_id = {m.model_id: m for m in inv.models}
        assert by_id["letters-1"].memory_need_mb >= by_id["letters-1"].file_size_mb
        assert by_id["letters-1"].last_load_s is not None
        assert by_id["letters-1"].recent_requests == 1
        assert by_id["digits-1"].last_load_s is None


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
