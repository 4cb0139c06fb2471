"""The fault battery's cluster: a dispatcher and agents as real processes, each agent with
its own settings, optionally behind a fault proxy; and the client that checks every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.fakes.fault_proxy import FaultProxy
from tests.processes import Service, start_service
from tests.waiting import free_port, wait_until_sync

TOKEN = "battery-cluster-token-c4n4ry"
API_KEY = "sk-battery-api-key-c4n4ry"
HEARTBEAT_S = 0.2


@dataclass
class AgentSpec:
    node_id: str
    models: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    proxied: bool = False  # the dispatcher reaches it through a FaultProxy


@dataclass
class BatteryCluster:
    dispatcher: Service
    dispatcher_config: dict[str, Any]
    agents: dict[str, Service]
    agent_configs: dict[str, dict[str, Any]]
    proxies: dict[str, FaultProxy]
    records: dict[str, Path]
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def nodes(self) -> dict[str, Any]:
        return {n["node_id"]: n for n in self.dispatcher.get("/v1/nodes", TOKEN)["data"]}

    def inventory(self, node_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.agents[node_id].get("/v1/node/inventory", TOKEN)
        return result

    def metrics(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(self.dispatcher.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric_sum(self, prefix: str) -> float:
        return sum(v for k, v in self.metrics().items() if k.startswith(prefix))

    def spawns(self, node_id: str) -> list[dict[str, Any]]:
        path = self.records[node_id]
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def live_llama_servers(self, node_id: str | None = None) -> list[int]:
        """Pids of this cluster's (or one node's) llama-servers (from the fake's spawn
        records) still alive."""
        pids = []
        for node in [node_id] if node_id is not None else self.agents:
            for spawn in self.spawns(node):
                with contextlib.suppress(psutil.Error):
                    if psutil.Process(spawn["pid"]).status() != psutil.STATUS_ZOMBIE:
                        pids.append(spawn["pid"])
        return pids

    def wait_nodes_up(self, node_ids: list[str] | None = None, timeout_s: float = 20) -> None:
        wanted = node_ids or list(self.agents)

        def up() -> bool:
            nodes = self.nodes()
            return all(n in nodes and nodes[n]["state"] == "up" for n in wanted)
        wait_until_sync(up, timeout_s=timeout_s, what=f"{wanted} up")

    def logs(self) -> str:
        return "\n".join(s.log() for s in [self.dispatcher, *self.agents.values()])


# -- reading a device, inventory schema v1 (one slot) or v2 (a set of instances) ---------


def device_waiting(device: dict[str, Any]) -> int:
    """Queued requests on a device (v1 `pending`, v2 each instance's `queued`)."""
    return int(device.get("pending", 0)) + sum(int(i.get("queued", 0))
                                               for i in device.get("instances", []))


def device_load(device: dict[str, Any]) -> int:
    """Requests in flight plus queued on a device."""
    return (int(device.get("in_flight", 0)) + device_waiting(device)
            + sum(int(i.get("in_flight", 0)) for i in device.get("instances", [])))


def device_ready(device: dict[str, Any], model_id: str | None = None) -> bool:
    """An instance (of model_id, if given) is ready on the device."""
    return any(i.get("state") == "ready" and model_id in (None, i.get("model_id"))
               for i in device.get("instances", []))


def fake_models(model_id: str, path: Path, roles: list[str], record: Path,
                **server_args: Any) -> dict[str, Any]:
    return {"model_id": model_id, "path": str(path), "roles": roles,
            "server_args": {"--fake-record": str(record), **server_args}}


@contextlib.contextmanager
def start_battery(tmp_path: Path, llama_bin: Path, specs: list[AgentSpec],
                  dispatcher_extra: dict[str, Any] | None = None,
                  env: dict[str, str] | None = None,
                  token_from_env: bool = False) -> Iterator[BatteryCluster]:
    """token_from_env: the cluster token is in ROLEMESH_CLUSTER_TOKEN, not in the configs."""
    token = {} if token_from_env else {"cluster_token": TOKEN}
    if token_from_env:
        env = {**(env or {}), "ROLEMESH_CLUSTER_TOKEN": TOKEN}
    dconf = {"listen_port": free_port(), **token, "api_keys": [API_KEY],
             "heartbeat_interval_s": HEARTBEAT_S, "node_timeout_s": 2.0,
             "node_forget_s": 120.0, **(dispatcher_extra or {})}
    with contextlib.ExitStack() as stack:
        dispatcher = stack.enter_context(start_service("dispatcher", dconf, tmp_path, env))
        agents: dict[str, Service] = {}
        configs: dict[str, dict[str, Any]] = {}
        proxies: dict[str, FaultProxy] = {}
        records: dict[str, Path] = {}
        for spec in specs:
            port = free_port()
            records[spec.node_id] = tmp_path / f"{spec.node_id}-spawns.jsonl"
            aconf: dict[str, Any] = {
                "node_id": spec.node_id, "listen_port": port, "backend": "cpu",
                "dispatcher_base_url": dispatcher.url, **token,
                "heartbeat_interval_s": HEARTBEAT_S, "llama_server_bin": str(llama_bin),
                "llama_server_probe_interval_s": 0.05, "llama_server_stop_grace_s": 2.0,
                "max_pending_requests_per_device": 32,
                "state_dir": str(tmp_path / f"{spec.node_id}-state"),
                "models": [{**m, "server_args": {**m.get("server_args", {}),
                                                 "--fake-record": str(records[spec.node_id])}}
                           for m in spec.models], **spec.extra}
            if spec.proxied:
                proxy = proxies[spec.node_id] = FaultProxy(port).start()
                stack.callback(proxy.stop)
                aconf["advertise_url"] = proxy.url
            configs[spec.node_id] = aconf
            agents[spec.node_id] = stack.enter_context(
                start_service("node_agent", aconf, tmp_path, env))
        cluster = BatteryCluster(dispatcher, dconf, agents, configs, proxies, records, tmp_path,
                                 env or {})
        cluster.wait_nodes_up()
        try:
            yield cluster
        finally:
            for svc in agents.values():  # a stopped (SIGSTOP) agent must be able to die
                with contextlib.suppress(ProcessLookupError):
                    os.kill(svc.proc.pid, signal.SIGCONT)
            for node_id in agents:
                for spawn in cluster.spawns(node_id):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(spawn["pid"], signal.SIGKILL)


# -- the client ----------------------------------------------------------------------------


@dataclass
class Result:
    status: int | None = None  # None: no answer at all (connection failed, or it hung)
    events: list[bytes] = field(default_factory=list)
    hung: bool = False
    error: str | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == b"data: [DONE]"

    @property
    def error_events(self) -> list[bytes]:
        return [e for e in self.events if e.startswith(b'data: {"error"')]

    @property
    def chunks(self) -> list[bytes]:
        return [e for e in self.events if e.startswith(b"data: {") and e not in
                self.error_events]

    def kind(self) -> str:
        """done | mid_stream_error | lost (no 200) | bad (anything else) | hung | cancelled"""
        if self.cancelled:
            return "cancelled"
        if self.hung:
            return "hung"
        if self.status != 200:
            return "lost"
        if self.done and not self.error_events:
            return "done"
        if (len(self.error_events) == 1 and self.events[-1] == self.error_events[0]
                and b"[DONE]" not in b"".join(self.events)):
            return "mid_stream_error" if self.chunks else "error_before_chunks"
        return "bad"


def split_events(raw: bytes) -> list[bytes]:
    return [e.strip() for e in raw.split(b"\n\n") if e.strip() and not e.startswith(b":")]


def chat(model: str, *, stream: bool = True, max_tokens: int = 12,
         prompt: str = "hi") -> dict[str, Any]:
    return {"model": model, "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]}


async def one_stream(s: aiohttp.ClientSession, url: str, body: dict[str, Any],
                     headers: dict[str, str], hang_s: float = 60.0,
                     cancel_after_events: int | None = None) -> Result:
    result = Result()
    try:
        async with asyncio.timeout(hang_s):
            async with s.post(url + "/v1/chat/completions", json=body,
                              headers=headers) as resp:
                result.status = resp.status
                if resp.status != 200:
                    result.error = (await resp.read()).decode(errors="replace")[:300]
                    return result
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    if cancel_after_events is not None and \
                            buffer.count(b"\n\n") >= cancel_after_events:
                        result.cancelled = True
                        resp.close()
                        break
                result.events = split_events(buffer)
    except TimeoutError:
        result.hung = True
    except aiohttp.ClientError as exc:
        result.error = repr(exc)
    return result


def tally(results: list[Result]) -> Counter[str]:
    return Counter(r.kind() for r in results)


TRACEBACK = re.compile(r"Traceback|Error handling request|Unhandled exception")
