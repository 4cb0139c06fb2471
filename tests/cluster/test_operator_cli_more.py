"""The CLI verbs and fixes of the operator-experience work against a running cluster."""

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


def test_watch_json_after_the_verb_route_exit_codes_and_an_agent_named_as_such(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = [model_entry("letters", tiny_models["letters"], ["chat"])]
    with start_cluster(tmp_path, fake_llama_server_bin, {"node-a": models}) as cluster:
        url = cluster.dispatcher.url
        cluster.client().chat.completions.create(
            model="chat", max_tokens=2, messages=[{"role": "user", "content": "x"}])

        watch = rolemesh(url, "watch", "--count", "1")
        assert watch.returncode == 0, watch.stderr
        assert watch.stdout.startswith("snapshot: 1 node(s): node-a (up, 1 device)")
        raw = rolemesh(url, "watch", "--count", "1", "--json")
        snapshot = json.loads(raw.stdout)
        assert snapshot["type"] == "snapshot"
        assert any(e["type"] == "request.done" for e in snapshot["recent"])

        listed = rolemesh(url, "models", "--json")
        assert listed.returncode == 0, listed.stderr
        assert "chat" in {m["id"] for m in json.loads(listed.stdout)["data"]}

        unknown = rolemesh(url, "route", "no-such-model")
        assert unknown.returncode == 4
        assert "404" in unknown.stdout
        assert rolemesh(url, "route", "chat").returncode == 0

        agent = cluster.agents["node-a"].url
        for verb in ("status", "nodes"):
            result = rolemesh(agent, verb)
            assert result.returncode == 1
            assert f"{agent} is a RoleMesh node agent (node 'node-a'), not a dispatcher" \
                in result.stderr
