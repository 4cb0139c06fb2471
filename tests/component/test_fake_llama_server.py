"""The fake llama-server itself: its endpoints, its llama-server command line, each knob."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKE_LLAMA_SERVER
from tests.waiting import free_port, wait_until_sync

MODEL = "/models/letters.gguf"


@dataclass
class Fake:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def connect(self, timeout_s: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = self.connect()
        try:
            return _exchange(conn, method, path, body)
        finally:
            conn.close()

    def healthy(self) -> bool:
        try:
            return self.request("GET", "/health")[0] == 200
        except OSError:
            return False


def _exchange(conn: http.client.HTTPConnection, method: str, path: str,
              body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw


@contextlib.contextmanager
def spawn(tmp_path: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None,
          wait_ready: bool = True) -> Iterator[Fake]:
    port = free_port() if port is None else port
    log = tmp_path / f"fake-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(FAKE_LLAMA_SERVER), "-m", MODEL, "--host", "127.0.0.1", "--port", str(port),
             *args], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True)
    fake = Fake(proc, port, log)
    try:
        if wait_ready:
            wait_until_sync(fake.healthy, timeout_s=10, what="the fake to be ready")
        yield fake
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def chat(stream: bool = False, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": "x", "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello"}], **extra}


def sse_events(raw: bytes) -> list[bytes]:
    return [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e.strip()]


def streamed_text(events: list[bytes]) -> str:
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events if e != b"[DONE]" and json.loads(e)["choices"])


def test_a_chat_completion_names_the_model_and_counts_usage(tmp_path):
    with spawn(tmp_path) as fake:
        status, body = fake.request("POST", "/v1/chat/completions", chat(max_tokens=3))
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": "letters letters letters"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_a_text_completion_and_the_default_of_eight_tokens(tmp_path):
    with spawn(tmp_path) as fake:
        status, body = fake.request("POST", "/v1/completions", {"prompt": "hi"})
    assert status == 200
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].split() == ["letters"] * 8


def test_models_lists_the_alias_else_the_model_path_as_given(tmp_path):
    with spawn(tmp_path, "--alias", "letters-1") as fake:
        _, listed = fake.request("GET", "/v1/models")
    (entry,) = listed["data"]
    assert entry["id"] == "letters-1"
    assert entry["aliases"] == ["letters-1", "letters.gguf"]
    with spawn(tmp_path) as fake:
        _, listed = fake.request("GET", "/v1/models")
    assert listed["data"][0]["id"] == MODEL


def test_a_stream_is_chunked_sse_ending_with_done_and_the_connection_is_reused(tmp_path):
    with spawn(tmp_path) as fake:
        conn = fake.connect()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(chat(stream=True)))
        resp = conn.getresponse()
        assert resp.getheader("Content-Type") == "text/event-stream"
        assert resp.getheader("Transfer-Encoding") == "chunked"
        events = sse_events(resp.read())
        assert events[-1] == b"[DONE]"
        assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert streamed_text(events) == "letters letters letters letters"
        # Same connection, once more: keep-alive survives a stream and a JSON answer.
        assert _exchange(conn, "POST", "/v1/chat/completions", chat())[0] == 200
        assert _exchange(conn, "GET", "/health")[0] == 200
        conn.close()


def test_a_stream_sends_usage_only_when_asked_like_llama_server(tmp_path):
    with spawn(tmp_path) as fake:
        _, raw = fake.request("POST", "/v1/chat/completions",
                              chat(stream=True, max_tokens=2,
                                   stream_options={"include_usage": True}))
    usage_event = json.loads(sse_events(raw)[-2])
    assert usage_event["choices"] == []
    assert usage_event["usage"]["completion_tokens"] == 2


def test_a_streamed_text_completion_carries_text_chunks(tmp_path):
    with spawn(tmp_path) as fake:
        _, raw = fake.request("POST", "/v1/completions",
                              {"prompt": "hi", "max_tokens": 2, "stream": True})
    events = sse_events(raw)
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == \
        "letters letters"


@pytest.mark.parametrize(("args", "env"), [
    (("--fake-load-delay-s", "0.6"), {}),
    ((), {"FAKE_LLAMA_LOAD_DELAY_S": "0.6"}),
], ids=["flag", "env"])
def test_health_says_loading_model_with_503_until_the_load_delay_has_passed(
        tmp_path, args, env):
    started = time.monotonic()
    with spawn(tmp_path, *args, env=env, wait_ready=False) as fake:
        wait_until_sync(lambda: _answers(fake), what="the port to open")
        status, body = fake.request("GET", "/health")
        assert status == 503
        assert body == {"error": {"code": 503, "message": "Loading model",
                                  "type": "unavailable_error"}}
        assert fake.request("POST", "/v1/chat/completions", chat())[0] == 503
        wait_until_sync(fake.healthy, what="ready")
        assert time.monotonic() - started >= 0.6


def _answers(fake: Fake) -> bool:
    try:
        fake.request("GET", "/health")
    except OSError:
        return False
    return True


def test_the_port_refuses_connections_for_a_moment_at_start(tmp_path):
    with spawn(tmp_path, wait_ready=False) as fake:
        with pytest.raises(ConnectionRefusedError):
            fake.request("GET", "/health")
        wait_until_sync(fake.healthy, what="ready")


@pytest.mark.parametrize(("args", "env"), [
    (("--fake-tokens-per-s", "25"), {}),
    ((), {"FAKE_LLAMA_TOKENS_PER_S": "25"}),
], ids=["flag", "env"])
def test_tokens_come_at_the_configured_rate(tmp_path, args, env):
    with spawn(tmp_path, *args, env=env) as fake:
        started = time.monotonic()
        status, _ = fake.request("POST", "/v1/chat/completions", chat(max_tokens=11))
        took = time.monotonic() - started
    assert status == 200
    assert 0.38 <= took < 2.0  # 10 gaps of 40 ms after the first token


def test_the_first_token_waits_for_ttft_and_chunks_arrive_as_made(tmp_path):
    with spawn(tmp_path, "--fake-ttft-s", "0.4", "--fake-tokens-per-s", "10") as fake:
        conn = fake.connect()
        started = time.monotonic()
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps(chat(stream=True, max_tokens=20)))
        resp = conn.getresponse()
        received = resp.read1(65536)  # the role chunk, sent at once
        role_s = time.monotonic() - started
        while b'"content": "letters"' not in received:
            received += resp.read1(65536)
        first_token_s = time.monotonic() - started
        conn.close()
    assert role_s < 0.35
    assert 0.4 <= first_token_s < 1.5  # long before the 2.3 s the whole answer takes


@pytest.mark.parametrize(("args", "env"), [
    (("--fake-crash-after", "1"), {}),
    ((), {"FAKE_LLAMA_CRASH_AFTER": "1"}),
], ids=["flag", "env"])
def test_crash_after_n_serves_n_then_dies_with_code_3_mid_response(tmp_path, args, env):
    with spawn(tmp_path, *args, env=env) as fake:
        assert fake.request("POST", "/v1/chat/completions", chat())[0] == 200
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            fake.request("POST", "/v1/chat/completions", chat())
        assert fake.proc.wait(timeout=5) == 3


def test_a_crash_mid_stream_leaves_a_partial_stream_without_done(tmp_path):
    with spawn(tmp_path, "--fake-crash-after", "0") as fake:
        conn = fake.connect()
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps(chat(stream=True, max_tokens=10)))
        resp = conn.getresponse()
        assert resp.status == 200
        received = b""
        with contextlib.suppress(http.client.IncompleteRead, ConnectionError):
            while chunk := resp.read1(65536):
                received += chunk
        conn.close()
        assert fake.proc.wait(timeout=5) == 3
    assert b"letters" in received
    assert b"[DONE]" not in received


@pytest.mark.parametrize(("args", "env"), [
    (("--fake-never-ready",), {}),
    (("--fake-never-ready", "on"), {}),
    ((), {"FAKE_LLAMA_NEVER_READY": "1"}),
], ids=["switch", "switch with value", "env"])
def test_never_ready_keeps_health_at_503(tmp_path, args, env):
    with spawn(tmp_path, *args, env=env, wait_ready=False) as fake:
        wait_until_sync(lambda: _answers(fake), what="the port to open")
        time.sleep(0.3)  # the claim is about time passing: nothing to wait on
        assert fake.request("GET", "/health")[0] == 503
        assert fake.request("GET", "/v1/models")[0] == 503


def test_sigterm_stops_it_promptly_with_code_0(tmp_path):
    with spawn(tmp_path) as fake:
        started = time.monotonic()
        fake.proc.send_signal(signal.SIGTERM)
        assert fake.proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(("args", "env"), [
    (("--fake-ignore-sigterm",), {}),
    ((), {"FAKE_LLAMA_IGNORE_SIGTERM": "true"}),
], ids=["flag", "env"])
def test_ignore_sigterm_leaves_only_sigkill(tmp_path, args, env):
    with spawn(tmp_path, *args, env=env) as fake:
        fake.proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            fake.proc.wait(timeout=0.5)
        assert fake.healthy()
        fake.proc.kill()
        assert fake.proc.wait(timeout=5) == -signal.SIGKILL


@pytest.mark.parametrize(("args", "env"), [
    (("--fake-exit-at-start", "7"), {}),
    ((), {"FAKE_LLAMA_EXIT_AT_START": "7"}),
], ids=["flag", "env"])
def test_exit_at_start_prints_an_error_and_exits_with_the_code(tmp_path, args, env):
    with spawn(tmp_path, *args, env=env, wait_ready=False) as fake:
        assert fake.proc.wait(timeout=5) == 7
        assert "error loading model" in fake.log.read_text()


@pytest.mark.parametrize("via_env", [False, True], ids=["flag", "env"])
def test_record_appends_argv_env_and_pid_per_start(tmp_path, via_env):
    record = tmp_path / "spawns.jsonl"
    args = () if via_env else ("--fake-record", str(record))
    env = {"CUDA_VISIBLE_DEVICES": "1", "UNRELATED_SECRET": "x"}
    if via_env:
        env["FAKE_LLAMA_RECORD"] = str(record)
    with spawn(tmp_path, *args, env=env) as first:
        pass
    with spawn(tmp_path, *args, env=env) as second:
        pass
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [line["pid"] for line in lines] == [first.proc.pid, second.proc.pid]
    assert lines[0]["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert "UNRELATED_SECRET" not in lines[0]["env"]
    assert lines[0]["argv"][1:3] == ["-m", MODEL]


def test_llama_server_flags_it_does_not_know_are_skipped_with_their_values(tmp_path):
    with spawn(tmp_path, "--flash-attn", "on", "--no-mmap", "-ngl", "99", "--foo=bar",
               "--threads-batch", "-1", "-c", "4096", "-np", "2", "-t", "1",
               "--fake-tokens-per-s", "500", "--pooling", "mean", "--alias=letters-9") as fake:
        _, listed = fake.request("GET", "/v1/models")
    assert listed["data"][0]["id"] == "letters-9"
    assert listed["data"][0]["meta"] == {"n_ctx": 4096, "n_parallel": 2}


def test_embeddings_answer_501_unless_enabled_then_a_deterministic_unit_vector(tmp_path):
    with spawn(tmp_path) as fake:
        status, body = fake.request("POST", "/v1/embeddings", {"input": "hello"})
    assert status == 501
    assert body["error"]["type"] == "not_supported_error"
    with spawn(tmp_path, "--embeddings", "--pooling", "mean") as fake:
        status, body = fake.request("POST", "/v1/embeddings", {"input": ["a", "b", "a"]})
    assert status == 200
    vectors = [d["embedding"] for d in body["data"]]
    assert vectors[0] == vectors[2] != vectors[1]
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-9
    assert body["usage"]["prompt_tokens"] == 3


def test_bad_json_gets_400_and_an_unknown_path_404(tmp_path):
    with spawn(tmp_path) as fake:
        conn = fake.connect()
        conn.request("POST", "/v1/chat/completions", body=b"{nope")
        resp = conn.getresponse()
        assert resp.status == 400
        assert json.loads(resp.read())["error"]["type"] == "invalid_request_error"
        assert _exchange(conn, "GET", "/nowhere")[0] == 404
        conn.close()


def test_port_0_binds_a_free_port_and_says_which(tmp_path):
    with spawn(tmp_path, port=0, wait_ready=False) as fake:
        wait_until_sync(lambda: "listening on" in fake.log.read_text(), what="listening")
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", fake.log.read_text())
        assert match is not None
        fake.port = int(match[1])
        assert fake.healthy()


def test_it_is_ready_within_half_a_second(tmp_path):
    started = time.monotonic()
    with spawn(tmp_path):
        assert time.monotonic() - started < 0.5
