"""The real llama.cpp llama-server on models written by rolemesh.tiny_gguf.

Each tiny model can only write its own characters, so the text tells which one answered;
these tests prove that on the real binary, with streaming and embeddings, and that the
memory estimate's KV cache matches what llama-server allocates.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rolemesh.memory_estimate import MIB, kv_cache_bytes, read_gguf_facts
from rolemesh.tiny_gguf import DIGITS, LETTERS, SYMBOLS, write_tiny_model
from tests.waiting import free_port, wait_until_sync

pytestmark = pytest.mark.real

CHARSETS = {"letters": LETTERS, "digits": DIGITS, "symbols": SYMBOLS}
STARTUP_TIMEOUT_S = 60.0


@dataclass
class Server:
    url: str
    log: Path
    ready_s: float

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def _healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise AssertionError(f"llama-server exited with code {proc.returncode}:\n{tail}")
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:  # refused while starting, or 503 while loading
        return False


@contextlib.contextmanager
def llama_server(binary: Path, model: Path, log_dir: Path, *extra: str) -> Iterator[Server]:
    port = free_port()
    log = log_dir / f"llama-server-{model.stem}-{port}.log"
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-t", "1", *extra]
    if "-c" not in extra:
        argv += ["-c", "512"]
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_sync(lambda: _healthy(url, proc, log), timeout_s=STARTUP_TIMEOUT_S,
                        interval_s=0.01, what=f"llama-server on {model.name} to be ready")
        yield Server(url, log, time.monotonic() - started)
    finally:
        proc.kill()
        proc.wait()


def chat(max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": max_tokens, **extra}


@pytest.mark.parametrize("name", sorted(CHARSETS))
def test_each_model_writes_only_its_own_characters(llama_server_bin, tiny_models, tmp_path,
                                                   name):
    with llama_server(llama_server_bin, tiny_models[name], tmp_path) as server:
        status, raw = server.post("/v1/chat/completions", chat())
    assert status == 200, raw
    body = json.loads(raw)
    text = body["choices"][0]["message"]["content"]
    assert len(text) == 16  # one character per token, and never an early end
    assert set(text) <= set(CHARSETS[name]), text
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"


def test_a_text_completion_also_keeps_to_the_charset(llama_server_bin, tiny_models, tmp_path):
    with llama_server(llama_server_bin, tiny_models["digits"], tmp_path) as server:
        status, raw = server.post("/v1/completions", {"prompt": "Count:", "max_tokens": 12})
    assert status == 200, raw
    text = json.loads(raw)["choices"][0]["text"]
    assert len(text) == 12
    assert set(text) <= set(DIGITS)


def test_streaming_sends_the_characters_as_sse_chunks_then_done(
        llama_server_bin, tiny_models, tmp_path):
    with llama_server(llama_server_bin, tiny_models["symbols"], tmp_path) as server:
        status, raw = server.post("/v1/chat/completions", chat(max_tokens=10, stream=True))
    assert status == 200
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e.strip()]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c["choices"])
    assert len(text) == 10
    assert set(text) <= set(SYMBOLS)


def test_embeddings_with_mean_pooling(llama_server_bin, tiny_models, tmp_path):
    with llama_server(llama_server_bin, tiny_models["letters"], tmp_path,
                      "--embeddings", "--pooling", "mean") as server:
        status, raw = server.post("/v1/embeddings", {"input": ["hello", "world"]})
    assert status == 200, raw
    data = json.loads(raw)["data"]
    assert len(data) == 2
    assert {len(d["embedding"]) for d in data} == {64}  # the model's width


def test_without_embeddings_enabled_the_endpoint_says_501(
        llama_server_bin, tiny_models, tmp_path):
    with llama_server(llama_server_bin, tiny_models["letters"], tmp_path) as server:
        status, _ = server.post("/v1/embeddings", {"input": "hello"})
    assert status == 501


def test_a_100mb_model_loads_and_keeps_to_its_charset(llama_server_bin, tmp_path):
    model = write_tiny_model(tmp_path / "wide-digits.gguf", charset=DIGITS, n_embd=768,
                             n_layer=8, seed=7)
    assert model.stat().st_size > 100e6
    with llama_server(llama_server_bin, model, tmp_path) as server:
        status, raw = server.post("/v1/chat/completions", chat(max_tokens=8))
    assert status == 200, raw
    text = json.loads(raw)["choices"][0]["message"]["content"]
    assert len(text) == 8
    assert set(text) <= set(DIGITS)
    assert server.ready_s < 30


@pytest.mark.parametrize(("ctx", "parallel"), [(512, 1), (1000, 1), (600, 2), (None, 2)])
def test_the_kv_cache_estimate_matches_what_llama_server_allocates(
        llama_server_bin, tmp_path, ctx, parallel):
    model = write_tiny_model(tmp_path / "gqa.gguf", charset=LETTERS, n_embd=256, n_layer=3,
                             n_head=8, n_head_kv=2, context_length=1024)
    extra = ["-np", str(parallel), "-lv", "4"] + (["-c", str(ctx)] if ctx else ["-c", "0"])
    with llama_server(llama_server_bin, model, tmp_path, *extra) as server:
        log = server.log.read_text(errors="replace")
    found = re.search(r"KV buffer size\s*=\s*([\d.]+) MiB", log)
    assert found is not None, "llama-server no longer logs its KV buffer size"
    expected = kv_cache_bytes(read_gguf_facts(model), ctx, parallel)
    assert expected is not None
    assert float(found[1]) == pytest.approx(expected / MIB, abs=0.01)
