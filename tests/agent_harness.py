"""Run a real node agent app in-process on a loopback port, with a fake device backend."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from node_agent.app import build_app
from node_agent.appkeys import NODE_KEY
from node_agent.backends import DeviceFigures
from node_agent.config import NodeAgentConfig
from node_agent.instance import ModelInstance
from node_agent.node import Node, check_model_files
from node_agent.scheduler import NodeScheduler
from tests.waiting import free_port


class FakeGpuBackend:
    """Devices with fixed figures, pinned like CUDA GPUs: the backend seam, faked."""

    name = "cuda"

    def __init__(self, memory_mb: list[int]) -> None:
        self.memory_mb = memory_mb

    def devices(self) -> list[DeviceFigures]:
        return [DeviceFigures(f"gpu:{i}", f"Fake GPU {i}", mb, 0, mb, 0.0,
                              pin_env=(("CUDA_VISIBLE_DEVICES", str(i)),))
                for i, mb in enumerate(self.memory_mb)]

    def close(self) -> None:
        return None


def agent_config(tmp_path: Path, models: list[dict[str, Any]], **overrides: Any
                 ) -> NodeAgentConfig:
    data: dict[str, Any] = {
        "node_id": "node-a", "listen_port": free_port(), "state_dir": str(tmp_path / "state"),
        "llama_server_startup_timeout_s": 10.0, "llama_server_probe_interval_s": 0.05,
        "llama_server_stop_grace_s": 2.0, "log_format": "console", "models": models,
    }
    data.update(overrides)
    return NodeAgentConfig.model_validate(data)


@dataclass
class RunningAgent:
    url: str
    app: web.Application
    config: NodeAgentConfig
    # What the scheduler told its listeners, in order: ("instance.loading", {...}), ...
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # Every instance the scheduler started, in order (a restart is a new instance).
    started: list[ModelInstance] = field(default_factory=list)

    @property
    def node(self) -> Node:
        return self.app[NODE_KEY]

    @property
    def scheduler(self) -> NodeScheduler:
        return self.node.scheduler

    def instance(self, model_id: str, *devices: str) -> ModelInstance | None:
        """The live instance of `model_id` on `devices` (default gpu:0), if any."""
        key = f"{model_id}@{'+'.join(devices or ('gpu:0',))}"
        return self.scheduler.instances.get(key)

    def queue(self, device_id: str = "gpu:0") -> tuple[int, int]:
        """(in flight, waiting) on a device, over all its instances."""
        return self.scheduler.queue_of(device_id)

    def loads(self, model_id: str | None = None) -> list[str]:
        """The models loaded so far, in order (every start of a llama-server)."""
        return [str(d["model"]) for k, d in self.events if k == "instance.loading"
                and (model_id is None or d["model"] == model_id)]

    def stops(self) -> list[tuple[str, str, str | None]]:
        """(model, reason, detail) of every instance stopped so far, in order."""
        return [(str(d["model"]), str(d["reason"]), d.get("detail")) for k, d in self.events
                if k == "instance.stopped"]

    def residents(self, device_id: str = "gpu:0") -> dict[str, str]:
        return {i.model_id: i.state.value for i in self.scheduler.instances_on(device_id)}


@contextlib.asynccontextmanager
async def running_agent(config: NodeAgentConfig, binary: Path,
                        gpus_mb: list[int] | None = None,
                        backend: Any = None) -> AsyncIterator[RunningAgent]:
    backend = backend or FakeGpuBackend(gpus_mb or [8000])
    app = build_app(config, backend, check_model_files(config), str(binary))
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    agent = RunningAgent(f"http://127.0.0.1:{config.listen_port}", app, config)
    scheduler = agent.scheduler
    scheduler.listeners.append(lambda kind, data: agent.events.append((kind, dict(data))))
    start = scheduler._start

    def watched_start(model_id: str, devices: tuple[str, ...], why: str) -> None:
        start(model_id, devices, why)
        agent.started.append(scheduler.instances[f"{model_id}@{'+'.join(devices)}"])

    scheduler._start = watched_start  # type: ignore[method-assign]
    agent.started.extend(scheduler.instances.values())  # pinned and preloaded, at start
    site = web.TCPSite(runner, "127.0.0.1", config.listen_port)
    await site.start()
    try:
        yield agent
    finally:
        await runner.cleanup()


def chat(model: str, *, stream: bool = False, max_tokens: int = 4) -> dict[str, Any]:
    return {"model": model, "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}]}


async def post_chat(session: aiohttp.ClientSession, url: str, model: str, **kw: Any
                    ) -> tuple[int, dict[str, str], Any]:
    headers = kw.pop("headers", None)
    async with session.post(url + "/v1/chat/completions", json=chat(model, **kw),
                            headers=headers) as resp:
        body = await resp.read()
        try:
            data: Any = await resp.json(content_type=None)
        except ValueError:
            data = body.decode()
        return resp.status, dict(resp.headers), data
