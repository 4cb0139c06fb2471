"""The dispatcher's access log, written by a real cluster and replayed by `rolemesh simulate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from rolemesh.simulate.cluster import load_cluster
from rolemesh.simulate.engine import simulate
from rolemesh.simulate.trace import log_files, read_access_log
from tests.cluster.harness import model_entry, start_cluster
from tests.waiting import wait_until_sync

MSG = [{"role": "user", "content": "hi"}]
# (name, stream) in the order a client sends them.
REQUESTS = [("chat", False), ("coder", True), ("chat", True), ("letters", False),
            ("coder", False), ("chat", False), ("digits", True), ("chat", False)]


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for f in log_files(path)
            for line in f.read_text().splitlines()]


@pytest.fixture
def logged_cluster(tmp_path, tiny_models, fake_llama_server_bin):
    models = [model_entry("letters", tiny_models["letters"], ["chat"]),
              model_entry("digits", tiny_models["digits"], ["coder"])]
    log = tmp_path / "logs" / "access.jsonl"
    # A small max_bytes: the log rotates a few times during the test.
    extra = {"access_log": {"path": str(log), "max_bytes": 1500, "backups": 20}}
    with start_cluster(tmp_path, fake_llama_server_bin, {"node-a": models},
                       dispatcher_extra=extra) as cluster:
        yield cluster, log


def send_all(client: openai.OpenAI) -> None:
    for name, stream in REQUESTS:
        if stream:
            chunks = client.chat.completions.create(
                model=name, messages=MSG, max_tokens=5, stream=True,
                stream_options={"include_usage": True})
            assert list(chunks)
        else:
            client.chat.completions.create(model=name, messages=MSG, max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-role", messages=MSG, max_tokens=5)


def test_every_request_gets_one_line_with_what_served_it_and_its_tokens(logged_cluster):
    cluster, log = logged_cluster
    send_all(cluster.client())
    wait_until_sync(lambda: len(log_lines(log)) == len(REQUESTS) + 1, timeout_s=10,
                    what="every request in the access log")
    lines = log_lines(log)
    assert len(log_files(log)) > 1  # it rotated, and the backups read in order
    assert [line["model"] for line in lines] == [n for n, _ in REQUESTS] + ["no-such-role"]
    assert [line["served_model"] for line in lines[:-1]] == [
        "letters", "digits", "letters", "letters", "digits", "letters", "digits", "letters"]
    assert {line["node"] for line in lines[:-1]} == {"node-a"}
    assert [line["stream"] for line in lines[:-1]] == [s for _, s in REQUESTS]
    assert all(line["completion_tokens"] == 5 and line["prompt_tokens"] > 0
               for line in lines[:-1])
    assert all(line["outcome"] == "ok" and line["status"] == 200 for line in lines[:-1])
    assert all(line["ttft_s"] is not None for line, (_, s) in zip(lines, REQUESTS, strict=False)
               if s)
    assert (lines[-1]["status"], lines[-1]["served_model"]) == (404, None)
    times = [line["ts"] for line in lines]
    assert times == sorted(times)


def test_replaying_the_log_reproduces_its_requests_and_model_sequence(logged_cluster,
                                                                       tiny_models, tmp_path):
    cluster, log = logged_cluster
    send_all(cluster.client())
    wait_until_sync(lambda: len(log_lines(log)) == len(REQUESTS) + 1, timeout_s=10,
                    what="every request in the access log")
    lines = log_lines(log)
    # The same cluster described for the simulator, with the node agent's model fields,
    # and about as fast as the fake llama-server (loads in well under the gaps between the
    # client's requests, which waited for each answer).
    fast = "load_s: 0.01, tokens_per_s: 1000, prefill_tokens_per_s: 100000"
    text = f"""
models:
  - {{model_id: letters, path: "{tiny_models['letters']}", roles: [chat], {fast}}}
  - {{model_id: digits, path: "{tiny_models['digits']}", roles: [coder], {fast}}}
nodes:
  - {{node_id: node-a, devices: [{{device_id: cpu}}]}}
"""
    trace = read_access_log(log_files(log))
    assert trace.calls == len(lines)
    run = simulate(load_cluster(text), "rolemesh", trace)
    replayed = sorted(run.requests, key=lambda r: r.first_t)
    assert [r.call.name for r in replayed] == [line["model"] for line in lines]
    assert [r.model_id for r in replayed] == [line["served_model"] for line in lines]
    assert [r.call.completion_tokens for r in replayed[:-1]] == [5] * len(REQUESTS)

    path = tmp_path / "replay.yaml"
    path.write_text(text)
    cli = subprocess.run([sys.executable, "-m", "rolemesh.cli", "simulate", "--cluster",
                          str(path), "--access-log", str(log), "--jsonl", "-"],
                         capture_output=True, text=True, timeout=60, check=True)
    runs = [json.loads(line) for line in cli.stdout.splitlines()]
    assert {r["trace"] for r in runs} == {"access-log"}
    assert all(r["requests"] == len(lines) for r in runs)
    assert all(r["unservable"] == 1 for r in runs)  # no-such-role
