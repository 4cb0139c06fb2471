"""The routing table on real processes: edited with the CLI, kept across a dispatcher restart,
and every llama-server endpoint passed through real agents (fake llama-server)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster.harness import TOKEN, model_entry, routed_node, start_cluster

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "adm-cluster"
TABLE: dict[str, Any] = {
    "task_types": {"planning": "architect", "implementation": "builder"},
    "content_rules": [{"name": "images", "when": {"images": True}, "role": "architect"}],
    "fallbacks": {"architect": ["builder"]},
}
MSG = [{"role": "user", "content": "hi"}]


def agents(tiny_models: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    return {"big": [model_entry("letters", tiny_models["letters"], ["architect"])],
            "small": [model_entry("digits", tiny_models["digits"], ["builder"])]}


def rolemesh(url: str, *args: str, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    full = {"PATH": "/usr/bin:/bin", "ROLEMESH_URL": url, "ROLEMESH_API_KEY": TOKEN,
            "ROLEMESH_ADMIN_KEY": ADMIN, **(env or {})}
    return subprocess.run([sys.executable, "-m", "rolemesh.cli", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=30)


def task(cluster: Any, task_type: str) -> str:
    raw = cluster.client().chat.completions.with_raw_response.create(
        model="auto", messages=MSG, max_tokens=2, extra_headers={
            "X-RoleMesh-Task-Type": task_type})
    assert raw.headers["x-rolemesh-rule"] == f"task_type:{task_type}"
    return routed_node(raw)


def test_the_table_edited_with_the_cli_takes_effect_at_once_and_survives_a_restart(
        tmp_path, tiny_models, fake_llama_server_bin):
    extra = {"admin_keys": [ADMIN], "routing": TABLE, "roles": {"plan": "architect"}}
    with start_cluster(tmp_path, fake_llama_server_bin, agents(tiny_models),
                       dispatcher_extra=extra) as cluster:
        url = cluster.dispatcher.url
        assert task(cluster, "implementation") == "small"
        assert "config.deprecated_key" in cluster.dispatcher.log()  # `roles:` is `aliases:`
        planned = cluster.client().chat.completions.with_raw_response.create(
            model="plan", messages=MSG, max_tokens=2)
        assert routed_node(planned) == "big"

        shown = rolemesh(url, "routing", "show")
        assert shown.returncode == 0, shown.stderr
        assert "version 1 (from config" in shown.stdout
        assert "implementation: builder" in shown.stdout

        new = tmp_path / "table.yaml"
        new.write_text(json.dumps({**TABLE, "task_types": {**TABLE["task_types"],
                                                           "implementation": "architect"}}))
        done = rolemesh(url, "routing", "set", str(new), "--if-match", "1")
        assert done.returncode == 0, done.stderr
        assert "version 2" in done.stdout
        assert task(cluster, "implementation") == "big"

        stale = rolemesh(url, "routing", "set", str(new), "--if-match", "1")
        assert stale.returncode == 1
        assert "HTTP 412" in stale.stderr

        editor = tmp_path / "editor.py"  # what a person would do in $EDITOR
        editor.write_text("import sys, pathlib\np = pathlib.Path(sys.argv[1])\n"
                          "p.write_text(p.read_text().replace('implementation: architect',"
                          " 'implementation: builder'))\n")
        edited = rolemesh(url, "routing", "edit", env={"EDITOR": f"{sys.executable} {editor}"})
        assert edited.returncode == 0, edited.stderr
        assert "version 3" in edited.stdout
        assert task(cluster, "implementation") == "small"

        unchanged = rolemesh(url, "routing", "edit", env={"EDITOR": "true"})
        assert (unchanged.returncode, unchanged.stdout.strip()) == (0, "no change")

        refused = rolemesh(url, "routing", "set", str(new), env={"ROLEMESH_ADMIN_KEY": "x"})
        assert refused.returncode == 1
        assert "HTTP 403" in refused.stderr
        assert (tmp_path / "dispatcher.routing.json").exists()

    # A new dispatcher with the same config file: the table it was left with, not the config's.
    with start_cluster(tmp_path, fake_llama_server_bin, agents(tiny_models),
                       dispatcher_extra=extra) as cluster:
        doc = cluster.dispatcher.get("/v1/routing", TOKEN)
        assert (doc["version"], doc["source"]) == (3, "file")
        assert "routing.loaded" in cluster.dispatcher.log()
        assert task(cluster, "implementation") == "small"


ENDPOINTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("/v1/embeddings", {"input": "hi"}),
    ("/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
    ("/infill", {"input_prefix": "def f(", "input_suffix": "):"}),
    ("/v1/messages", {"max_tokens": 2, "messages": MSG}),
    ("/v1/responses", {"input": "hi"}),
    ("/tokenize", {"content": "hi"}),
    ("/detokenize", {"tokens": [104, 105]}),
]


@pytest.mark.parametrize(("path", "body"), ENDPOINTS, ids=[p for p, _ in ENDPOINTS])
async def test_every_llama_server_endpoint_is_routed_through_a_real_agent(
        tmp_path, tiny_models, fake_llama_server_bin, path, body):
    one = {"small": [model_entry("digits", tiny_models["digits"], ["builder"],
                                 embeddings=True)]}
    table = {**TABLE, "declared_roles": ["architect"]}
    with start_cluster(tmp_path, fake_llama_server_bin, one,
                       dispatcher_extra={"routing": table}) as cluster:
        async with aiohttp.ClientSession() as s, s.post(
                cluster.dispatcher.url + path, json={"model": "implementation", **body},
                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
            assert resp.headers["X-RoleMesh-Rule"] == "task_type:implementation"
            assert resp.headers["X-RoleMesh-Node"] == "small"
        if "model" in answer:
            assert answer["model"] == "digits"
