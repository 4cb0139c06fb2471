"""The `rolemesh` operator CLI against a running dispatcher with one agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cluster.harness import TOKEN, model_entry, start_cluster

ROOT = Path(__file__).resolve().parents[2]


def rolemesh(url: str, *args: str, key: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "ROLEMESH_URL": url}
    if key:
        env["ROLEMESH_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "rolemesh.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)


def test_status_nodes_models_route_and_check_fit_describe_the_cluster(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = [model_entry("letters", tiny_models["letters"], ["chat"]),
              model_entry("digits", tiny_models["digits"], ["coder"])]
    with start_cluster(tmp_path, fake_llama_server_bin, {"node-a": models},
                       dispatcher_extra={"api_keys": ["sk-1"],
                                         "aliases": {"code": "coder"}}) as cluster:
        url = cluster.dispatcher.url
        cluster.client(api_key="sk-1").chat.completions.create(
            model="chat", max_tokens=2, messages=[{"role": "user", "content": "x"}])

        status = rolemesh(url, "status")
        assert status.returncode == 0, status.stderr
        assert "nodes up: 1" in status.stdout
        assert "node-a" in status.stdout

        nodes = rolemesh(url, "nodes")
        row = next(line for line in nodes.stdout.splitlines() if line.startswith("node-a"))
        assert "cpu" in row
        assert "letters" in row
        assert "ready" in row

        listed = rolemesh(url, "models").stdout
        for name in ("letters", "digits", "chat", "coder", "code"):
            assert name in listed

        route = rolemesh(url, "route", "code")
        assert route.returncode == 0, route.stderr
        assert "digits on node-a/cpu" in route.stdout
        assert "evict_idle_model" in route.stdout

        raw = json.loads(rolemesh(url, "--json", "route", "chat").stdout)
        assert raw["action"] == "use_loaded"
        assert raw["winner"]["reason"] == "model_loaded"

        fit = rolemesh(url, "check-fit", str(tiny_models["letters"]), "--ctx-size", "512")
        assert fit.returncode == 0, fit.stderr
        assert "WEIGHTS" in fit.stdout  # the breakdown per device
        assert "cpu: fits" in fit.stdout

        by_alias = cluster.client(api_key="sk-1").chat.completions.create(
            model="code", max_tokens=2, messages=[{"role": "user", "content": "x"}])
        assert "digits" in (by_alias.choices[0].message.content or "")  # alias -> coder

        denied = rolemesh(url, "nodes", key=None)
        assert denied.returncode == 1
        assert "401" in denied.stderr


def test_an_unreachable_dispatcher_is_a_clear_error():
    result = rolemesh("http://127.0.0.1:9", "status")
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr
