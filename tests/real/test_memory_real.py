"""The memory estimate against the real llama-server's own figures, and a real measurement.

Every case of bench/memory_accuracy.py (dense and MoE tiny models; several context sizes,
KV cache types, parallel, ubatch, flash attention off, partial gpu_layers, n_cpu_moe and
cpu_moe) starts llama-server once, about a tenth of a second each for these sizes.
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import urllib.request
import zlib

import pytest

from bench.memory_accuracy import CASES, FLOOR_MIB, TOLERANCE, run_case
from node_agent.backends.host import process_memory_mb
from node_agent.config import STRUCTURED_FLAGS, ModelConfig
from node_agent.footprints import Footprints
from node_agent.llama_argv import build_argv
from node_agent.memory_charge import charge, read_model_memory
from rolemesh.net import free_loopback_port
from rolemesh.tiny_gguf import LETTERS, write_tiny_model, write_tiny_projector
from tests.waiting import wait_until_sync

pytestmark = pytest.mark.real

MEMORY_FIELDS = ("cache_type_k", "cache_type_v", "mmproj", "n_cpu_moe", "cpu_moe",
                 "override_tensor")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("memory-models")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_component_is_within_10_percent_of_what_llama_cpp_allocated(
        llama_server_bin, models_dir, case):
    row = run_case(llama_server_bin, models_dir, case)
    for component, (estimate, actual) in row.figures.items():
        assert abs(estimate - actual) <= max(TOLERANCE * actual, FLOOR_MIB), (
            f"{case.name} {component}: estimate {estimate} MiB, llama.cpp {actual} MiB")


def test_a_tiny_projector_lets_the_tiny_model_take_an_image(llama_server_bin, tmp_path):
    text = write_tiny_model(tmp_path / "t.gguf", charset=LETTERS, n_embd=128)
    mmproj = write_tiny_projector(tmp_path / "mmproj.gguf", text_n_embd=128, n_embd=128,
                                  image_size=56, patch_size=14)
    port = free_loopback_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(llama_server_bin), "-m", str(text), "--mmproj",
                                 str(mmproj), "--port", str(port), "-t", "1", "-c", "512"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_sync(lambda: "model loaded" in log.read_text(errors="replace"),
                        timeout_s=60, what="llama-server to load with the projector")
        image = "data:image/png;base64," + base64.b64encode(_png(8, 8)).decode()
        body = {"max_tokens": 6, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": image}}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.load(resp)
    finally:
        proc.kill()
        proc.wait()
    assert set(answer["choices"][0]["message"]["content"]) <= set(LETTERS)
    assert answer["usage"]["prompt_tokens"] > 16  # the image's 16 patches became tokens


def _png(width: int, height: int) -> bytes:
    """A small RGB PNG written by hand (no imaging library needed)."""
    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in (x * 30, y * 30, 128))
                    for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_the_memory_flags_the_agent_emits_are_llama_servers_own(llama_server_bin):
    help_text = subprocess.run([str(llama_server_bin), "--help"], capture_output=True,
                               text=True, timeout=30).stdout
    for field in MEMORY_FIELDS:
        for flag in STRUCTURED_FLAGS[field].split():
            assert f"{flag}," in help_text or f"{flag} " in help_text, (field, flag)


def test_a_loaded_model_is_measured_and_the_figure_kept_for_the_next_start(
        llama_server_bin, tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", charset=LETTERS, n_embd=256, n_layer=4,
                            n_vocab=20000)
    model = ModelConfig.model_validate({"model_id": "m", "path": str(path), "ctx_size": 2048,
                                        "cache_type_k": "q8_0", "threads": 1})
    argv = build_argv(llama_server_bin, model, free_loopback_port())
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_sync(lambda: "model loaded" in log.read_text(errors="replace"),
                        timeout_s=60, what="llama-server to load")
        measured = process_memory_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    memory = read_model_memory(model)
    before = charge(memory, ["cpu"], Footprints(tmp_path / "state"))
    assert measured is not None
    assert before.source == "estimated"
    # RSS holds the runtime (libraries, the HTTP server) besides the buffers: more than the
    # estimate, but the same order for a model this small.
    assert before.estimated_mb < measured < before.estimated_mb + 400
    Footprints(tmp_path / "state").record(model, measured, ("cpu",))
    after = charge(memory, ["cpu"], Footprints(tmp_path / "state"))  # as after a restart
    assert (after.source, after.per_device_mb) == ("measured", {"cpu": measured})
    assert after.error_pct is not None
    assert after.error_pct < 0


def test_the_accuracy_benchmark_prints_its_table_and_json(llama_server_bin):
    import os
    import sys

    done = subprocess.run([sys.executable, "-m", "bench.memory_accuracy", "--quick"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ROLEMESH_LLAMA_SERVER_BIN": str(llama_server_bin)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| model, config | weights est / llama.cpp MiB")
    rows = [line for line in lines if line.startswith("| ") and line.endswith("| yes |")]
    assert len(rows) == sum(c.quick for c in CASES)
    figures = json.loads(lines[-1].removeprefix("BENCH_JSON "))
    assert set(figures) == {c.name for c in CASES if c.quick}
