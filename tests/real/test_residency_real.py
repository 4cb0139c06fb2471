"""Co-residency with the real llama.cpp llama-server on the CPU device: two tiny models
loaded side by side answer in turn with no restart in between, then go by TTL."""

from __future__ import annotations

import re

import openai
import psutil
import pytest

from tests.processes import start_service
from tests.waiting import free_port, wait_until_sync

pytestmark = pytest.mark.real


def test_two_real_models_co_reside_answer_in_turn_and_unload_by_ttl(
        tmp_path, tiny_models, llama_server_bin):
    config = {
        "node_id": "real-node", "listen_port": free_port(), "backend": "cpu",
        "state_dir": str(tmp_path / "state"), "llama_server_bin": str(llama_server_bin),
        "llama_server_startup_timeout_s": 60, "log_format": "json", "default_ttl_s": 3.0,
        "models": [
            {"model_id": "letters", "path": str(tiny_models["letters"]), "roles": ["chat"],
             "ctx_size": 256, "threads": 1},
            {"model_id": "digits", "path": str(tiny_models["digits"]), "roles": ["coder"],
             "ctx_size": 256, "threads": 1},
        ],
    }
    with start_service("node_agent", config, tmp_path) as agent:
        def children() -> list[psutil.Process]:  # this agent's llama-servers, no one else's
            return psutil.Process(agent.proc.pid).children(recursive=True)

        c = openai.OpenAI(base_url=agent.url + "/v1", api_key="-", max_retries=0, timeout=60)
        for _ in range(3):
            chat = c.chat.completions.create(
                model="chat", max_tokens=6, messages=[{"role": "user", "content": "hi"}])
            assert re.fullmatch(r"[a-z\s]+", chat.choices[0].message.content or "")
            code = c.chat.completions.create(
                model="coder", max_tokens=6, messages=[{"role": "user", "content": "hi"}])
            assert re.fullmatch(r"[0-9\s]+", code.choices[0].message.content or "")
        # Two llama-servers, started once each, both still alive side by side.
        assert len(children()) == 2
        started = agent.log().count('"event": "instance.loading"')
        assert started == 2, agent.log()[-3000:]
        (cpu,) = agent.get("/v1/node/inventory")["devices"]
        assert {i["model_id"] for i in cpu["instances"]} == {"letters", "digits"}
        assert all(i["state"] == "ready" and i["ttl_left_s"] is not None
                   for i in cpu["instances"])

        def unloaded() -> bool:
            inventory = agent.get("/v1/node/inventory")
            return not inventory["devices"][0]["instances"]
        wait_until_sync(unloaded, timeout_s=30, what="both unloaded by TTL")
        stops = agent.get("/v1/node/inventory")["recent_stops"]
        assert sorted((s["model_id"], s["reason"]) for s in stops) == [
            ("digits", "ttl"), ("letters", "ttl")]
        wait_until_sync(lambda: not children(), timeout_s=10, what="their llama-servers gone")


def test_what_a_real_load_measured_replaces_the_estimate_and_survives_a_restart(
        tmp_path, tiny_models, llama_server_bin):
    config = {
        "node_id": "real-node", "listen_port": free_port(), "backend": "cpu",
        "state_dir": str(tmp_path / "state"), "llama_server_bin": str(llama_server_bin),
        "llama_server_startup_timeout_s": 60, "log_format": "json",
        "models": [{"model_id": "letters", "path": str(tiny_models["letters"]),
                    "roles": ["chat"], "ctx_size": 256, "threads": 1}],
    }
    with start_service("node_agent", config, tmp_path) as agent:
        before = {m["model_id"]: m for m in agent.get("/v1/node/inventory")["models"]}
        assert before["letters"]["memory_source"] == "estimated"
        parts = before["letters"]["memory_breakdown"]  # from llama.cpp's placement rules
        assert parts["weights_gpu_mb"] >= 1
        assert parts["kv_cache_mb"] >= 0
        assert parts["host_mb"] == 0  # on the CPU device, host RAM is the device
        estimated = before["letters"]["memory_need_mb"]
        c = openai.OpenAI(base_url=agent.url + "/v1", api_key="-", max_retries=0, timeout=60)
        c.chat.completions.create(model="chat", max_tokens=2,
                                  messages=[{"role": "user", "content": "hi"}])
        inventory = agent.get("/v1/node/inventory")
        (inst,) = inventory["devices"][0]["instances"]
        assert inst["memory_source"] == "measured"
        assert inst["memory_measured_mb"] > 0
        assert inst["memory_charged_mb"] == inst["memory_measured_mb"]
        assert inst["memory_estimated_mb"] == estimated
        assert inventory["host_memory_total_mb"] > inventory["host_memory_available_mb"] > 0
    assert (tmp_path / "state").is_dir()
    with start_service("node_agent", config, tmp_path) as agent:  # kept in state_dir
        models = {m["model_id"]: m for m in agent.get("/v1/node/inventory")["models"]}
        assert models["letters"]["memory_source"] == "measured"
        assert models["letters"]["memory_need_mb"] == inst["memory_measured_mb"]
