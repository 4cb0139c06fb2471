"""Run a real node agent app in-process on a loopback port, with a fake device backend."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from node_agent.app import build_app
from node_agent.appkeys import NODE_KEY
from node_agent.backends import DeviceFigures
from node_agent.config import NodeAgentConfig
from node_agent.node import Node, check_model_files
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

    @property
    def node(self) -> Node:
        return self.app[NODE_KEY]

    def slot(self, device_id: str = "gpu:0") -> Any:
        return self.node.slots[device_id]


@contextlib.asynccontextmanager
async def running_agent(config: NodeAgentConfig, binary: Path,
                        gpus_mb: list[int] | None = None,
                        backend: Any = None) -> AsyncIterator[RunningAgent]:
    backend = backend or FakeGpuBackend(gpus_mb or [8000])
    app = build_app(config, backend, check_model_files(config), str(binary))
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", config.listen_port)
    await site.start()
    try:
        yield RunningAgent(f"http://127.0.0.1:{config.listen_port}", app, config)
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
