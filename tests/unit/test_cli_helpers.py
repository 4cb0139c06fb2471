"""CLI pieces without a cluster: flags after the verb, watch's lines, `up`'s model names."""

from __future__ import annotations

import argparse

import pytest

from rolemesh.cli_ops import hoist_global_flags
from rolemesh.cli_up import build_configs, models_from_dir, role_from_name
from rolemesh.cli_watch import describe, events
from rolemesh.config_loading import ConfigError


@pytest.mark.parametrize(("argv", "expected"), [
    (["models", "--json"], ["--json", "models"]),
    (["route", "chat", "--url", "http://h:1"], ["--url", "http://h:1", "route", "chat"]),
    (["--json", "nodes"], ["--json", "nodes"]),
    (["route", "--url=http://h:1", "x"], ["--url=http://h:1", "route", "x"]),
    (["routing", "set", "--", "--json"], ["routing", "set", "--", "--json"]),
])
def test_global_flags_after_the_verb_move_in_front(argv, expected):
    assert hoist_global_flags(argv) == expected


@pytest.mark.parametrize(("stem", "role"), [
    ("qwen2.5-coder-7b-instruct-q4_k_m", "coder"), ("nomic-embed-text-v1.5", "embeddings"),
    ("Qwen2-VL-7B", "vision"), ("llama-3.1-8b-instruct", "chat"), ("mystery", "chat"),
    ("deepseek-r1-distill", "planner")])
def test_a_models_role_comes_from_its_file_name(stem, role):
    assert role_from_name(stem) == role


def test_a_models_folder_gives_one_model_per_gguf_and_each_role_once(tmp_path):
    for name in ("a-coder.gguf", "b-coder.gguf", "chat.gguf", "x-00002-of-00002.gguf",
                 "notes.txt"):
        (tmp_path / name).write_bytes(b"GGUF")
    models = models_from_dir(tmp_path)
    assert [m["model_id"] for m in models] == ["a-coder", "b-coder", "chat"]
    assert [m["roles"] for m in models] == [["coder"], ["coder"], []]  # chat is a model id


def test_an_up_config_with_relative_model_paths_reads_them_from_its_folder(tmp_path):
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "up.yaml"
    config.write_text("agent:\n  models:\n    - {model_id: m, path: models/m.gguf}\n"
                      "dispatcher:\n  listen_port: 9999\n")
    args = argparse.Namespace(config=config, models_dir=None, host="127.0.0.1", port=8080,
                              agent_port=8081, state_dir=tmp_path / "s")
    dispatcher, agent, _ = build_configs(args)
    assert dispatcher["listen_port"] == 9999
    assert agent["dispatcher_base_url"] == "http://127.0.0.1:9999"
    assert agent["models"][0]["path"] == str(tmp_path / "conf" / "models" / "m.gguf")


def test_an_empty_models_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no \.gguf file"):
        models_from_dir(tmp_path)


def test_watch_reads_sse_payloads_and_skips_comments():
    stream = [b": keep-alive\n", b"\n", b"event: node.up\n", b"id: 1\n",
              b'data: {"type": "node.up", "node_id": "a"}\n', b"\n"]
    assert list(events(stream)) == [{"type": "node.up", "node_id": "a"}]


@pytest.mark.parametrize(("event", "line"), [
    ({"type": "request.done", "name": "chat", "model_id": "m", "node_id": "a",
      "device_id": "gpu:0", "outcome": "ok", "duration_s": 1.5, "ttft_s": 0.2},
     "request chat -> m on a/gpu:0: ok in 1.50s (first byte 200ms)"),
    ({"type": "model.stopped", "model_id": "m", "node_id": "a", "device_id": "cpu",
      "reason": "evicted_for", "detail": "n"}, "stopped m on a/cpu: evicted_for: n"),
    ({"type": "node.down", "node_id": "a", "why": "missed heartbeats"},
     "node a down (missed heartbeats)"),
    ({"type": "snapshot", "nodes": [{"node_id": "a", "state": "up", "devices": [{}]}]},
     "snapshot: 1 node(s): a (up, 1 device)"),
])
def test_watch_describes_each_event_in_one_line(event, line):
    assert describe(event) == line

