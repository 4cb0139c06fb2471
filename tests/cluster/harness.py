"""A dispatcher and node agents as real subprocesses on loopback ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from tests.processes import Service, start_service
from tests.waiting import free_port, wait_until_sync

TOKEN = "cluster-test-token"
HEARTBEAT_S = 0.2


def model_entry(model_id: str, path: Path, roles: list[str], **extra: Any) -> dict[str, Any]:
    return {"model_id": model_id, "path": str(path), "roles": roles, **extra}


@dataclass
class Cluster:
    dispatcher: Service
    agents: dict[str, Service]
    records: dict[str, Path]  # node id -> the fake llama-server's spawn record
    workdir: Path
    extra_pids: list[int] = field(default_factory=list)

    def client(self, api_key: str = "-", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.dispatcher.url + "/v1", api_key=api_key,
                             max_retries=0, timeout=60, **kw)

    def nodes(self) -> dict[str, Any]:
        return {n["node_id"]: n for n in self.dispatcher.get("/v1/nodes", TOKEN)["data"]}

    def spawns(self, node_id: str) -> list[dict[str, Any]]:
        path = self.records[node_id]
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def wait_nodes(self, state: str, node_ids: list[str], timeout_s: float = 15) -> None:
        def ok() -> bool:
            nodes = self.nodes()
            return all(n in nodes and nodes[n]["state"] == state for n in node_ids)
        wait_until_sync(ok, timeout_s=timeout_s, what=f"{node_ids} {state}")


@contextlib.contextmanager
def start_cluster(tmp_path: Path, llama_bin: Path, agents: dict[str, list[dict[str, Any]]],
                  dispatcher_extra: dict[str, Any] | None = None,
                  agent_extra: dict[str, Any] | None = None) -> Iterator[Cluster]:
    dconf = {"listen_port": free_port(), "cluster_token": TOKEN,
             "heartbeat_interval_s": HEARTBEAT_S, "node_timeout_s": 1.0,
             "node_forget_s": 60.0, **(dispatcher_extra or {})}
    with contextlib.ExitStack() as stack:
        dispatcher = stack.enter_context(start_service("dispatcher", dconf, tmp_path))
        services: dict[str, Service] = {}
        records: dict[str, Path] = {}
        for node_id, configured in agents.items():
            record = tmp_path / f"{node_id}-spawns.jsonl"
            records[node_id] = record
            models = configured
            if llama_bin.name == "fake_llama_server.py":
                models = [{**m, "server_args": {**m.get("server_args", {}),
                                                "--fake-record": str(record)}}
                          for m in configured]
            aconf = {"node_id": node_id, "listen_port": free_port(), "backend": "cpu",
                     "dispatcher_base_url": dispatcher.url, "cluster_token": TOKEN,
                     "heartbeat_interval_s": HEARTBEAT_S, "llama_server_bin": str(llama_bin),
                     "llama_server_probe_interval_s": 0.05,
                     "state_dir": str(tmp_path / f"{node_id}-state"), "models": models,
                     **(agent_extra or {})}
            services[node_id] = stack.enter_context(start_service("node_agent", aconf, tmp_path))
        cluster = Cluster(dispatcher, services, records, tmp_path)
        cluster.wait_nodes("up", list(agents))
        try:
            yield cluster
        finally:
            for svc in services.values():  # a stopped (SIGSTOP) agent must be able to die
                with contextlib.suppress(ProcessLookupError):
                    os.kill(svc.proc.pid, signal.SIGCONT)
            for node_id in agents:  # children of agents killed with -9 are orphans: end them
                for spawn in cluster.spawns(node_id):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(spawn["pid"], signal.SIGKILL)
            time.sleep(0)


def routed_node(raw: Any) -> str:
    """The node that answered, from a `with_raw_response` result's headers."""
    return str(raw.headers.get("x-rolemesh-node"))
