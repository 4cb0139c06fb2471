"""`rolemesh-node-agent` as a process: config checks, start-up refusals, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from tests.processes import llama_server_pids, start_service
from tests.waiting import free_port, wait_until_sync

ROOT = Path(__file__).resolve().parents[2]


def run_cli(config: dict | str, tmp_path: Path, *args: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "node.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "node_agent.cli", "--config", str(path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def base(tmp_path: Path, tiny: dict[str, Path], **extra: object) -> dict:
    return {"node_id": "n1", "listen_port": free_port(), "state_dir": str(tmp_path / "s"),
            "backend": "cpu", "models": [{"model_id": "m", "path": str(tiny["letters"]),
                                          "roles": ["chat"], "ctx_size": 512}], **extra}


def test_check_config_prints_the_resolved_config_with_the_token_masked(tmp_path, tiny_models):
    result = run_cli(base(tmp_path, tiny_models, cluster_token="hunter2"), tmp_path,
                     "--check-config")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["cluster_token"] == "***"
    assert "hunter2" not in result.stdout + result.stderr
    assert resolved["listen_host"] == "127.0.0.1"
    assert resolved["model_memory_need_mb"]["m"] > 0


def test_a_config_error_exits_2_naming_file_key_and_problem(tmp_path, tiny_models):
    config = base(tmp_path, tiny_models)
    config["models"][0]["server_args"] = {"--ctx-size": 4096}
    config["heartbeat_intervall_s"] = 3
    result = run_cli(config, tmp_path, "--check-config")
    assert result.returncode == 2
    assert "node.yaml: models.0.server_args: '--ctx-size' is set by the structured field " \
        "'ctx_size'" in result.stderr
    assert "node.yaml: heartbeat_intervall_s: unknown key" in result.stderr


def test_a_missing_or_non_gguf_model_file_exits_2(tmp_path, tiny_models):
    config = base(tmp_path, tiny_models)
    config["models"].append({"model_id": "gone", "path": str(tmp_path / "nope.gguf")})
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    config["models"].append({"model_id": "zip", "path": str(not_gguf)})
    result = run_cli(config, tmp_path)
    assert result.returncode == 2
    assert "models.1.path (gone)" in result.stderr
    assert "does not exist" in result.stderr
    assert "models.2.path (zip)" in result.stderr


def test_parallel_above_the_pending_limit_is_a_config_error(tmp_path, tiny_models):
    config = base(tmp_path, tiny_models, max_pending_requests_per_device=2)
    config["models"][0]["parallel"] = 4
    result = run_cli(config, tmp_path, "--check-config")
    assert result.returncode == 2
    assert "max_pending_requests_per_device" in result.stderr


def test_without_llama_server_it_refuses_to_start_naming_both_places(tmp_path, tiny_models):
    config = base(tmp_path, tiny_models, llama_server_bin=str(tmp_path / "no-such-binary"))
    result = run_cli(config, tmp_path)
    assert result.returncode == 3
    assert "no-such-binary" in result.stderr


def test_a_backend_that_cannot_work_here_says_so_at_start(tmp_path, tiny_models,
                                                          fake_llama_server_bin):
    config = base(tmp_path, tiny_models, backend="vulkan",
                  llama_server_bin=str(fake_llama_server_bin))
    result = run_cli(config, tmp_path)
    assert result.returncode == 3
    assert "vulkan backend: not supported" in result.stderr


def test_sigterm_stops_the_agent_and_every_llama_server_it_started(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = base(tmp_path, tiny_models, llama_server_bin=str(fake_llama_server_bin))
    with start_service("node_agent", config, tmp_path) as agent:
        body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "x"}]})
        request = urllib.request.Request(agent.url + "/v1/chat/completions", body.encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200
        children = llama_server_pids(under=agent.proc.pid)
        assert children
        assert agent.stop(signal.SIGTERM) == 0
    wait_until_sync(lambda: not (llama_server_pids() & children), timeout_s=5,
                    what="children gone")
    log = agent.log()
    assert "agent.stopped" in log
