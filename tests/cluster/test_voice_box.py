"""The voice-box recipe end to end, with the openai SDK through the dispatcher.

One node with two fake 12 GB GPUs: a small chat model and a mid-size "think" model stay warm
together; a long-context coder model split over both GPUs runs alone (exclusive) and evicts
them when called; a later chat request evicts it again. Plus the operator's verbs (load,
unload, drain, undrain) through the API and the CLI, and a TTL unload with no traffic.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.cluster.harness import HEARTBEAT_S, TOKEN
from tests.processes import Service, start_service
from tests.waiting import free_port, wait_until_sync

GPU_MB = "12288,12288"


def voice_box_models(tiny: dict[str, Path], record: Path) -> list[dict[str, Any]]:
    fake = {"server_args": {"--fake-record": str(record)}}
    return [
        {"model_id": "chat-small", "path": str(tiny["letters"]), "roles": ["chat"],
         "memory_mb": 4000, **fake},
        {"model_id": "think-small", "path": str(tiny["digits"]), "roles": ["think"],
         "memory_mb": 6000, **fake},
        {"model_id": "think-big", "path": str(tiny["symbols"]), "roles": ["coder"],
         "memory_mb": 20000, "devices": ["gpu:0", "gpu:1"], "tensor_split": [1, 1],
         "exclusive": True, **fake},
    ]


@contextlib.contextmanager
def voice_box(tmp_path: Path, llama: Path, tiny: dict[str, Path],
              **agent_extra: Any) -> Iterator[tuple[Service, Service, Path]]:
    record = tmp_path / "spawns.jsonl"
    dconf = {"listen_port": free_port(), "cluster_token": TOKEN,
             "heartbeat_interval_s": HEARTBEAT_S, "node_timeout_s": 1.0, "node_forget_s": 60.0}
    aconf = {"node_id": "voice", "listen_port": free_port(), "cluster_token": TOKEN,
             "heartbeat_interval_s": HEARTBEAT_S, "llama_server_bin": str(llama),
             "llama_server_probe_interval_s": 0.05, "state_dir": str(tmp_path / "state"),
             "models": voice_box_models(tiny, record), **agent_extra}
    with start_service("dispatcher", dconf, tmp_path) as dispatcher:
        aconf["dispatcher_base_url"] = dispatcher.url
        with start_service("node_agent", aconf, tmp_path, env={"FAKE_GPUS_MB": GPU_MB},
                           module="tests.fakes.fake_gpu_node") as agent:
            wait_until_sync(lambda: "voice" in nodes(dispatcher), what="node registered")
            yield dispatcher, agent, record


def nodes(dispatcher: Service) -> dict[str, Any]:
    return {n["node_id"]: n for n in dispatcher.get("/v1/nodes", TOKEN)["data"]}


def resident(dispatcher: Service) -> dict[str, set[str]]:
    """Per device of the node: the models ready on it, as the dispatcher shows them."""
    node = nodes(dispatcher)["voice"]
    return {d["status"]["device_id"]: {i["model_id"] for i in d["status"]["instances"]
                                       if i["state"] == "ready"} for d in node["devices"]}


def spawns(record: Path) -> list[str]:
    if not record.exists():
        return []
    return [Path(json.loads(line)["argv"][json.loads(line)["argv"].index("--model") + 1]).stem
            for line in record.read_text().splitlines()]


def ask(dispatcher: Service, role: str) -> Any:
    client = openai.OpenAI(base_url=dispatcher.url + "/v1", api_key=TOKEN, max_retries=0,
                           timeout=60)
    return client.chat.completions.with_raw_response.create(
        model=role, messages=[{"role": "user", "content": "hi"}], max_tokens=3)


@pytest.fixture
def fake(fake_llama_server_bin: Path) -> Path:
    return fake_llama_server_bin


def test_voice_box_keeps_chat_and_think_warm_and_the_big_model_takes_both_gpus(
        tmp_path, fake, tiny_models):
    with voice_box(tmp_path, fake, tiny_models) as (dispatcher, _agent, record):
        for _ in range(3):  # alternating two co-resident models: two loads, no more
            assert ask(dispatcher, "chat").parse().model
            assert ask(dispatcher, "think").parse().model
        assert sorted(spawns(record)) == ["digits", "letters"]
        wait_until_sync(lambda: set().union(*resident(dispatcher).values()) ==
                        {"chat-small", "think-small"}, what="both resident")

        route = dispatcher.get("/v1/route?model=coder", TOKEN)
        (group,) = route["candidates"]
        assert group["device_id"] == "gpu:0+gpu:1"
        assert sorted(group["evicts"]) == ["chat-small", "think-small"]
        assert group["memory"]["need_on_device_mb"] == 10000  # its share on each GPU
        assert group["memory"]["usable_mb"] == int(12288 * 0.9)

        raw = ask(dispatcher, "coder")  # exclusive over both GPUs: evicts both
        assert raw.headers["x-rolemesh-routed-to"] == "voice/gpu:0+gpu:1"
        assert spawns(record)[-1] == "symbols"

        def big_alone() -> bool:
            res = resident(dispatcher)
            return res == {"gpu:0": {"think-big"}, "gpu:1": {"think-big"}}
        wait_until_sync(big_alone, what="think-big alone on both GPUs")
        node = nodes(dispatcher)["voice"]
        charged = {d["status"]["device_id"]: d["status"]["memory_charged_mb"]
                   for d in node["devices"]}
        assert charged == {"gpu:0": 10000, "gpu:1": 10000}  # a device group charges both
        evicted = [(s["model_id"], s["reason"], s["detail"]) for s in node["recent_stops"]]
        assert ("chat-small", "evicted_for", "think-big") in evicted
        assert ("think-small", "evicted_for", "think-big") in evicted

        assert ask(dispatcher, "chat").parse().model  # and a small request evicts it
        wait_until_sync(lambda: "think-big" not in set().union(*resident(dispatcher).values()),
                        what="think-big evicted")
        stops = nodes(dispatcher)["voice"]["recent_stops"]
        assert ("think-big", "evicted_for", "chat-small") in [
            (s["model_id"], s["reason"], s["detail"]) for s in stops]


def rolemesh(dispatcher: Service, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rolemesh.cli", "--url", dispatcher.url,
                           *args], capture_output=True, text=True, timeout=60,
                          env={"ROLEMESH_API_KEY": TOKEN, "PATH": "/usr/bin:/bin"})


def test_load_unload_drain_and_undrain_through_the_api_and_the_cli(tmp_path, fake, tiny_models):
    with voice_box(tmp_path, fake, tiny_models) as (dispatcher, _agent, record):
        done = rolemesh(dispatcher, "load", "think-small")
        assert done.returncode == 0, done.stderr
        assert "think-small" in done.stdout
        wait_until_sync(lambda: "think-small" in set().union(*resident(dispatcher).values()),
                        what="think-small loaded")
        assert spawns(record) == ["digits"]

        done = rolemesh(dispatcher, "unload", "think-small")
        assert done.returncode == 0, done.stderr
        wait_until_sync(lambda: not set().union(*resident(dispatcher).values()),
                        what="unloaded")
        stops = nodes(dispatcher)["voice"]["recent_stops"]
        assert stops[-1]["model_id"] == "think-small"
        assert stops[-1]["reason"] == "unload"

        ask(dispatcher, "chat")
        done = rolemesh(dispatcher, "drain", "voice")
        assert done.returncode == 0, done.stderr
        with pytest.raises(openai.APIStatusError) as refused:  # nothing else to route to
            ask(dispatcher, "chat")
        assert refused.value.status_code == 503
        wait_until_sync(lambda: not set().union(*resident(dispatcher).values()),
                        what="drained")
        assert nodes(dispatcher)["voice"]["draining"] is True
        done = rolemesh(dispatcher, "undrain", "voice")
        assert done.returncode == 0, done.stderr
        assert ask(dispatcher, "chat").parse().model

        # Without a key the operator verbs are refused.
        refused_cli = subprocess.run(
            [sys.executable, "-m", "rolemesh.cli", "--url", dispatcher.url, "unload", "chat-small"],
            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert refused_cli.returncode != 0
        assert "401" in refused_cli.stderr


def test_a_ttl_unload_fires_with_no_traffic_and_says_why(tmp_path, fake, tiny_models):
    with voice_box(tmp_path, fake, tiny_models, default_ttl_s=0.5) as (dispatcher, _a, _r):
        ask(dispatcher, "chat")
        wait_until_sync(lambda: not set().union(*resident(dispatcher).values()),
                        timeout_s=15, what="TTL unload")
        stops = nodes(dispatcher)["voice"]["recent_stops"]
        assert stops[-1]["model_id"] == "chat-small"
        assert stops[-1]["reason"] == "ttl"
