"""What an operator reads from a running cluster: the event stream, metrics on both services,
llama-server's own output through the agent and the dispatcher, and the dashboard's files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import TOKEN, model_entry, start_cluster
from tests.waiting import wait_until_sync

ROOT = Path(__file__).resolve().parents[2]


def get_text(url: str, token: str | None = TOKEN) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


class EventReader:
    """`rolemesh watch --json` in a subprocess: GET /v1/events as the CLI reads it."""

    def __init__(self, url: str, token: str | None) -> None:
        env = {**os.environ, "ROLEMESH_URL": url}
        env.pop("ROLEMESH_API_KEY", None)
        if token:
            env["ROLEMESH_API_KEY"] = token
        self.proc = subprocess.Popen([sys.executable, "-m", "rolemesh.cli", "watch", "--json"],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e["type"] == type_]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def cluster(tmp_path, tiny_models, fake_llama_server_bin):
    models = [model_entry("letters", tiny_models["letters"], ["chat"]),
              model_entry("digits", tiny_models["digits"], ["coder"])]
    with start_cluster(tmp_path, fake_llama_server_bin, {"node-a": models},
                       dispatcher_extra={"api_keys": ["sk-1"]}) as c:
        yield c


@pytest.fixture
def switching_cluster(tmp_path, tiny_models, fake_llama_server_bin):
    """Like `cluster`, but its CPU holds one model at a time: every other model evicts."""
    models = [model_entry("letters", tiny_models["letters"], ["chat"]),
              model_entry("digits", tiny_models["digits"], ["coder"])]
    with start_cluster(tmp_path, fake_llama_server_bin, {"node-a": models},
                       dispatcher_extra={"api_keys": ["sk-1"]},
                       agent_extra={"co_residency": False}) as c:
        yield c


def test_the_event_stream_shows_the_snapshot_a_load_an_eviction_and_each_request(
        switching_cluster):
    cluster = switching_cluster
    url = cluster.dispatcher.url
    reader = EventReader(url, "sk-1")
    try:
        wait_until_sync(lambda: bool(reader.of_type("snapshot")), what="the snapshot")
        snapshot = reader.of_type("snapshot")[0]
        assert [n["node_id"] for n in snapshot["nodes"]] == ["node-a"]

        client = cluster.client(api_key="sk-1")
        client.chat.completions.create(model="chat", max_tokens=2,
                                       messages=[{"role": "user", "content": "x"}])
        for _ in client.chat.completions.create(model="coder", max_tokens=2, stream=True,
                                                messages=[{"role": "user", "content": "x"}]):
            pass
        wait_until_sync(lambda: len(reader.of_type("request.done")) == 2, timeout_s=15,
                        what="two request.done events")
        first, second = reader.of_type("request.done")
        assert (first["name"], first["model_id"], first["node_id"], first["device_id"],
                first["outcome"]) == ("chat", "letters", "node-a", "cpu", "ok")
        assert second["model_id"] == "digits"
        assert second["ttft_s"] is not None
        assert second["ttft_s"] <= second["duration_s"]

        wait_until_sync(lambda: any(e["model_id"] == "letters" for e in
                                    reader.of_type("model.stopped")), timeout_s=15,
                        what="letters stopped for digits")
        stop = next(e for e in reader.of_type("model.stopped") if e["model_id"] == "letters")
        assert stop["reason"] == "evicted_for"
        assert stop["detail"] == "digits"
        wait_until_sync(lambda: any(e["model_id"] == "digits" for e in
                                    reader.of_type("model.loaded")), timeout_s=15,
                        what="digits loaded")
    finally:
        reader.close()

    status, body, _ = get_text(url + "/v1/events", token=None)
    assert status == 401
    assert json.loads(body)["error"]["code"] == "invalid_token"


def test_metrics_on_both_services_count_requests_and_show_devices(cluster):
    client = cluster.client(api_key="sk-1")
    for _ in client.chat.completions.create(model="chat", max_tokens=2, stream=True,
                                            messages=[{"role": "user", "content": "x"}]):
        pass
    status, text, _ = get_text(cluster.dispatcher.url + "/metrics", token=None)
    assert status == 200
    assert ('rolemesh_dispatcher_requests_done_total{endpoint="/v1/chat/completions",'
            'model="letters",outcome="ok",role="chat"} 1.0') in text
    assert 'rolemesh_dispatcher_time_to_first_token_seconds_count{' in text
    assert 'rolemesh_dispatcher_device_memory_total_mb{device="cpu",node="node-a"}' in text

    agent = cluster.agents["node-a"]
    status, text, _ = get_text(agent.url + "/metrics")
    assert status == 200, text
    assert 'rolemesh_agent_in_flight{device="cpu"} 0.0' in text
    assert ('rolemesh_agent_requests_total{endpoint="/v1/chat/completions",model="letters",'
            'outcome="ok",role="-"} 1.0') in text
    assert ('rolemesh_agent_request_duration_seconds_count{endpoint="/v1/chat/completions",'
            'model="letters"} 1.0') in text
    assert 'rolemesh_agent_queue_depth{device="cpu"} 0.0' in text
    assert 'rolemesh_agent_device_memory_total_mb{device="cpu",node="node-a"}' in text
    assert get_text(agent.url + "/metrics", token=None)[0] == 401  # the agent's token guards it


def done_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        if '"request.done"' in line:
            lines.append(json.loads(line))
    return lines


def test_request_done_log_lines_name_the_model_node_and_device_on_both_hops(cluster):
    cluster.client(api_key="sk-1").chat.completions.create(
        model="chat", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    wait_until_sync(lambda: bool(done_lines(cluster.dispatcher.log())), what="request.done")
    line = done_lines(cluster.dispatcher.log())[0]
    assert (line["model"], line["model_id"], line["node"], line["device"], line["status"]) \
        == ("chat", "letters", "node-a", "cpu", 200)
    agent_line = done_lines(cluster.agents["node-a"].log())[0]
    assert (agent_line["node_id"], agent_line["device"], agent_line["model"]) == \
        ("node-a", "cpu", "letters")
    assert agent_line["request_id"] == line["request_id"]


def test_llama_server_output_is_readable_from_the_agent_and_through_the_dispatcher(cluster):
    client = cluster.client(api_key="sk-1")
    client.chat.completions.create(model="chat", max_tokens=2,
                                   messages=[{"role": "user", "content": "x"}])
    agent = cluster.agents["node-a"]
    status, body, _ = get_text(agent.url + "/v1/node/logs?device=cpu&model=letters")
    assert status == 200, body
    lines = json.loads(body)["lines"]
    assert any("listening" in line or "model loaded" in line for line in lines), lines

    status, body, _ = get_text(agent.url + "/v1/node/logs?device=cpu&model=digits")
    assert status == 404
    assert json.loads(body)["error"]["code"] == "instance_not_found"
    status, body, _ = get_text(agent.url + "/v1/node/logs?device=gpu:7")
    assert status == 400

    status, body, _ = get_text(cluster.dispatcher.url
                               + "/v1/nodes/node-a/logs?device=cpu&lines=2", token="sk-1")
    assert status == 200, body
    assert len(json.loads(body)["lines"]) == 2

    req = urllib.request.Request(agent.url + "/v1/node/logs?device=cpu&follow=1",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = resp.readline().decode()
        assert first.startswith("data: {\"line\":")


def test_the_dashboard_pages_are_served_without_a_key_and_the_api_still_wants_one(cluster):
    url = cluster.dispatcher.url
    for path, marker in (("/", "<title>RoleMesh</title>"), ("/routing", "routing"),
                         ("/ui/app.js", "instancesOf"), ("/ui/style.css", ".bar")):
        status, body, _ = get_text(url + path, token=None)
        assert status == 200, path
        assert marker in body
    assert get_text(url + "/v1/nodes", token=None)[0] == 401


def test_a_node_that_dies_shows_as_a_node_down_event(cluster):
    reader = EventReader(cluster.dispatcher.url, "sk-1")
    try:
        wait_until_sync(lambda: bool(reader.of_type("snapshot")), what="the snapshot")
        cluster.agents["node-a"].stop(signal.SIGKILL)  # no word to the dispatcher
        wait_until_sync(lambda: bool(reader.of_type("node.down")), timeout_s=15,
                        what="node.down")
        down = reader.of_type("node.down")[0]
        assert down["node_id"] == "node-a"
        assert down["why"] == "missed heartbeats"
    finally:
        reader.close()


def test_a_node_that_stops_deregisters_and_is_forgotten_at_once(cluster):
    reader = EventReader(cluster.dispatcher.url, "sk-1")
    try:
        wait_until_sync(lambda: bool(reader.of_type("snapshot")), what="the snapshot")
        cluster.agents["node-a"].stop()  # SIGTERM
        wait_until_sync(lambda: bool(reader.of_type("node.forgotten")), timeout_s=15,
                        what="node.forgotten")
        gone = reader.of_type("node.forgotten")[0]
        assert gone["node_id"] == "node-a"
        assert gone["why"] == "deregistered"
        assert not reader.of_type("node.down")
    finally:
        reader.close()
