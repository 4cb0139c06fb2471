"""The node agent with the real llama.cpp llama-server on tiny generated models, on the CPU."""

from __future__ import annotations

import re

import openai
import pytest

from tests.processes import llama_server_pids, start_service
from tests.waiting import free_port, wait_until_sync

pytestmark = pytest.mark.real


@pytest.fixture
def agent(tmp_path, tiny_models, llama_server_bin):
    config = {
        "node_id": "real-node", "listen_port": free_port(), "backend": "cpu",
        "state_dir": str(tmp_path / "state"), "llama_server_bin": str(llama_server_bin),
        "llama_server_startup_timeout_s": 60, "log_format": "json",
        "models": [
            {"model_id": "letters", "path": str(tiny_models["letters"]),
             "roles": ["planner"], "ctx_size": 256, "threads": 1},
            {"model_id": "digits", "path": str(tiny_models["digits"]),
             "roles": ["coder"], "ctx_size": 256, "threads": 1, "embeddings": True},
        ],
    }
    with start_service("node_agent", config, tmp_path) as service:
        yield service
        children = llama_server_pids(under=service.proc.pid)
    wait_until_sync(lambda: not (llama_server_pids() & children), timeout_s=10,
                    what="no llama-server left after the agent stopped")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)


def test_real_llama_server_answers_by_role_streams_and_keeps_both_models_resident(agent):
    c = client(agent.url)
    letters = c.chat.completions.create(
        model="planner", max_tokens=12, messages=[{"role": "user", "content": "hello"}])
    text = letters.choices[0].message.content or ""
    assert re.fullmatch(r"[a-z\s]+", text), text

    pieces = [chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(
        model="coder", max_tokens=12, stream=True,
        messages=[{"role": "user", "content": "hello"}]) if chunk.choices]
    streamed = "".join(pieces)
    assert len([p for p in pieces if p]) > 1  # arrived in pieces, not one buffered blob
    assert re.fullmatch(r"[0-9\s]+", streamed), streamed

    inventory = agent.get("/v1/node/inventory")
    (cpu,) = inventory["devices"]
    assert cpu["device_id"] == "cpu"
    assert {(i["model_id"], i["state"]) for i in cpu["instances"]} == {
        ("letters", "ready"), ("digits", "ready")}  # both fit: co-resident, no switch
    assert cpu["memory_charged_mb"] == sum(i["memory_charged_mb"] for i in cpu["instances"])
    assert cpu["memory_total_mb"] > 0
    models = {m["model_id"]: m for m in inventory["models"]}
    assert models["letters"]["last_load_s"] is not None
    assert models["digits"]["memory_need_mb"] >= models["digits"]["file_size_mb"]

    again = c.chat.completions.create(
        model="planner", max_tokens=8, messages=[{"role": "user", "content": "again"}])
    assert re.fullmatch(r"[a-z\s]+", again.choices[0].message.content or "")
    assert agent.get("/v1/node/inventory")["recent_stops"] == []  # nothing was evicted


def test_real_llama_server_serves_embeddings(agent):
    c = client(agent.url)
    result = c.embeddings.create(model="coder", input=["one", "two"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) > 8
    assert result.data[0].embedding != result.data[1].embedding
