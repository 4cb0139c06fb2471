"""node_agent.metrics: llama-server's timings, queues of v1 and v2 devices, the API."""

from __future__ import annotations

import json

from node_agent.handlers_ops import LogSource
from node_agent.metrics import AgentMetrics, parse_timings, queue_of

TIMINGS = {"prompt_n": 5, "prompt_ms": 12.5, "predicted_n": 8, "predicted_ms": 40.0,
           "predicted_per_second": 200.0}


def test_timings_are_read_from_a_buffered_answer():
    body = json.dumps({"choices": [], "timings": TIMINGS}).encode()
    assert parse_timings(body) == (12.5, 200.0)


def test_timings_are_read_from_the_last_chunk_of_a_stream_that_has_them():
    stream = (b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
              b'data: {"choices": [], "timings": ' + json.dumps(TIMINGS).encode() + b'}\n\n'
              b"data: [DONE]\n\n")
    assert parse_timings(stream) == (12.5, 200.0)


def test_an_answer_without_timings_gives_none():
    assert parse_timings(b'{"choices": []}') is None
    assert parse_timings(b"data: [DONE]\n\n") is None
    assert parse_timings(b"not json") is None


def test_the_queue_of_a_v1_device_and_of_a_v2_device_with_instances():
    assert queue_of({"device_id": "gpu:0", "in_flight": 2, "pending": 1}) == (2, 1)
    v2 = {"device_id": "gpu:0", "instances": [{"in_flight": 1, "queued": 3},
                                              {"in_flight": 2, "queued": 0}]}
    assert queue_of(v2) == (3, 3)


def test_what_the_core_reports_shows_in_the_scrape():
    m = AgentMetrics()
    m.read_devices_from(lambda: ("n", [{"device_id": "gpu:0", "memory_total_mb": 24000,
                                        "memory_used_mb": 1000, "memory_charged_mb": 5000,
                                        "utilization_pct": 37.0, "instances": []}]))
    m.request("/v1/chat/completions", "qwen", "chat", "ok")
    m.latency("/v1/chat/completions", "qwen", 1.5)
    m.time_to_first_token("/v1/chat/completions", "qwen", 0.2)
    assert m.timings("qwen", {"timings": TIMINGS})
    m.model_load("qwen", "gpu:0", 3.0)
    m.model_load("big", "gpu:0", None, ok=False)
    m.stopped("qwen", "gpu:0", "ttl")
    m.restart("qwen", "gpu:0")
    m.crash("qwen", "gpu:0")
    text = m.render().decode()
    for line in (
        'rolemesh_agent_requests_total{endpoint="/v1/chat/completions",model="qwen",'
        'outcome="ok",role="chat"} 1.0',
        'rolemesh_agent_tokens_per_second_count{model="qwen"} 1.0',
        'rolemesh_agent_model_loads_total{device="gpu:0",model="big",outcome="failed"} 1.0',
        'rolemesh_agent_model_stops_total{device="gpu:0",model="qwen",reason="ttl"} 1.0',
        'rolemesh_agent_crashes_total{device="gpu:0",model="qwen"} 1.0',
        'rolemesh_agent_device_memory_charged_mb{device="gpu:0",node="n"} 5000.0',
        'rolemesh_agent_device_utilization_pct{device="gpu:0",node="n"} 37.0',
        'rolemesh_agent_in_flight{device="gpu:0"} 0.0',
    ):
        assert line in text, line


class NodeWithLogs:
    """A node offers its instances' output itself."""

    def log_lines(self, device: str, model: str | None) -> list[str] | None:
        return ["line"] if device == "gpu:0" else None

    def subscribe(self, device: str, model: str | None):  # type: ignore[no-untyped-def]
        return None


def test_a_node_that_offers_logs_is_a_log_source():
    assert isinstance(NodeWithLogs(), LogSource)
    assert not isinstance(object(), LogSource)
