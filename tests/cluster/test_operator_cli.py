"""The `rolemesh` operator CLI against a running dispatcher with one agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cluster.harness import TOKEN, model_entry, start_cluster
from tests.waiting import wait_until_sync

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
        assert "cpu: letters" in status.stdout

        nodes = rolemesh(url, "nodes")
        assert nodes.returncode == 0, nodes.stderr
        header, row = nodes.stdout.splitlines()[:2]
        assert header.split() == ["NODE", "STATE", "DEVICE", "NAME", "FREE/TOTAL", "QUEUE",
                                  "MODE", "MODEL", "INSTANCE", "IN+Q", "CHARGED", "TTL", "LEFT"]
        assert row.startswith("node-a")
        cells = row.split()
        assert "cpu" in cells
        assert "auto" in cells
        assert cells[-5:-2] == ["letters", "ready", "0+0"]
        assert cells[-2].endswith(("M", "G"))
        assert cells[-1] == "-"

        listed = rolemesh(url, "models").stdout
        for name in ("letters", "digits", "chat", "coder", "code"):
            assert name in listed

        route = rolemesh(url, "route", "code")
        assert route.returncode == 0, route.stderr
        assert "digits on node-a/cpu" in route.stdout
        assert "load_beside (fits_beside)" in route.stdout  # room beside letters


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

        def both_listed() -> bool:
            out = rolemesh(url, "nodes").stdout
            return "letters" in out and "digits" in out
        wait_until_sync(both_listed, what="both instances in `rolemesh nodes`")
        lines = rolemesh(url, "nodes").stdout.splitlines()[1:]
        assert len(lines) == 2
        assert lines[1].split()[0] == "digits"

        denied = rolemesh(url, "nodes", key=None)
        assert denied.returncode == 1
        assert "401" in denied.stderr


def test_an_unreachable_dispatcher_is_a_clear_error():
    result = rolemesh("http://127.0.0.1:9", "status")
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr
