"""The real llama-server closes the connection after each streamed answer while its headers
say keep-alive: the agent must not lose a request to such a pooled connection."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.processes import start_service
from tests.waiting import free_port

pytestmark = pytest.mark.real


async def test_no_stream_is_lost_to_the_real_llama_servers_closed_connections(
        tmp_path, tiny_models, llama_server_bin):
    config = {
        "node_id": "real-node", "listen_port": free_port(), "backend": "cpu",
        "state_dir": str(tmp_path / "state"), "llama_server_bin": str(llama_server_bin),
        "llama_server_startup_timeout_s": 60, "log_format": "json", "log_level": "warning",
        "max_pending_requests_per_device": 64,
        "models": [{"model_id": "letters", "path": str(tiny_models["letters"]),
                    "roles": ["planner"], "ctx_size": 512, "threads": 1, "parallel": 2}],
    }
    with start_service("node_agent", config, tmp_path) as agent:
        body = {"model": "planner", "stream": True, "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as s:
            gate = asyncio.Semaphore(8)

            async def one() -> tuple[int, bytes]:
                async with gate, s.post(agent.url + "/v1/chat/completions",
                                        json=body) as resp:
                    return resp.status, await resp.read()

            await one()  # loaded
            results = await asyncio.gather(*(one() for _ in range(200)))
        lost = [r for r in results if r[0] != 200 or not r[1].rstrip().endswith(b"[DONE]")]
        print(f"real llama-server: {len(lost)} of {len(results)} streams lost")
        assert lost == [], lost[:2]
