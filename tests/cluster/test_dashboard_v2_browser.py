"""The dashboard renders schema v2 inventories (several instances per device, charged
memory, TTL, pinned, modes, backoffs, stop reasons), served by a stand-in API in the test.

The real dispatcher serves today's inventory (test_dashboard_browser.py); this page test
pins the v2 shape of rolemesh/api.py's next schema so the page is ready when it lands.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from dispatcher.dashboard import STATIC
from tests.cluster.test_dashboard_browser import browser_page  # noqa: F401 (a fixture)

INSTANCE = {"devices": ["gpu:0"], "in_flight": 0, "queued": 0, "parallel": 1,
            "memory_source": "measured", "memory_estimated_mb": 5000, "memory_measured_mb": 4800,
            "pinned": False, "idle_s": 10.0, "ttl_left_s": 290.0, "last_load_s": 3.2,
            "restarts": 0, "draining_for": None, "last_error": None}
NODES = [{
    "node_id": "gpu-box-1", "url": "http://gpu-box-1.lan:8081", "backend": "cuda", "state": "up",
    "last_heartbeat_age_s": 1.2, "registered_age_s": 600.0, "draining": False,
    "sets": [{"name": "coding"}], "models": [{"model_id": "qwen-7b"}, {"model_id": "coder-7b"}],
    "devices": [{"node_id": "gpu-box-1", "dispatcher_in_flight": 1, "status": {
        "device_id": "gpu:0", "name": "NVIDIA RTX 4090", "backend": "cuda",
        "memory_total_mb": 24564, "memory_used_mb": 10100, "memory_free_mb": 14464,
        "memory_charged_mb": 9800, "mode": "coding", "failed_models": {"big-70b": 42.0},
        "pending_limit": 4, "instances": [
            {**INSTANCE, "model_id": "qwen-7b", "state": "ready", "in_flight": 1,
             "queued": 2, "memory_charged_mb": 4800},
            {**INSTANCE, "model_id": "coder-7b", "state": "starting", "pinned": True,
             "memory_charged_mb": 5000, "memory_source": "estimate", "ttl_left_s": None}]}}],
}]
RECENT = [
    {"id": 1, "type": "model.stopped", "at": 0, "node_id": "gpu-box-1", "device_id": "gpu:0",
     "devices": ["gpu:0"], "model_id": "mistral-7b", "reason": "ttl", "detail": None},
    {"id": 2, "type": "request.done", "at": 0, "name": "planner", "model_id": "qwen-7b",
     "node_id": "gpu-box-1", "device_id": "gpu:0", "outcome": "ok", "ttft_s": 0.21,
     "duration_s": 2.5},
]


def stand_in_api() -> web.Application:
    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def nodes(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": NODES})

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        now = time.time()
        snapshot = {"type": "snapshot", "at": now, "nodes": NODES, "last_id": 2,
                    "recent": [{**e, "at": now - 30} for e in RECENT]}
        await resp.write(f"event: snapshot\ndata: {json.dumps(snapshot)}\n\n".encode())
        await asyncio.sleep(3600)
        return resp

    async def unload(_: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "coder-7b is pinned", "type":
                                            "invalid_request_error", "code": "pinned"}},
                                 status=409)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_static("/ui/", STATIC)
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_get("/v1/events", events)
    app.router.add_post("/v1/models/{model}/unload", unload)
    return app


@pytest.fixture
def api_url() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        runner = web.AppRunner(stand_in_api(), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        box["runner"] = runner
        box["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()),
                                              loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield box["url"]
    finally:
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_v2_device_shows_each_instance_its_memory_ttl_mode_and_backoff(
        api_url, browser_page):  # noqa: F811 (the fixture)
    page = browser_page
    page.goto(api_url + "/")
    page.fill("#key", "sk-admin")
    page.click("#keyform button")
    page.wait_for_selector("[data-testid=instance][data-model=coder-7b]")
    rows = {r.get_attribute("data-model"): r.inner_text()
            for r in page.query_selector_all("[data-testid=instance]")}
    assert set(rows) == {"qwen-7b", "coder-7b"}
    assert "ready" in rows["qwen-7b"]
    assert "1 + 2" in rows["qwen-7b"]  # in flight + queued
    assert "5 min" in rows["qwen-7b"]  # the idle TTL left
    assert "measured" in rows["qwen-7b"]
    assert "pinned" in rows["coder-7b"]
    assert "starting" in rows["coder-7b"]
    memory = page.inner_text("[data-testid=memory]")
    assert "charged 9.6 GB" in memory
    assert "measured 9.9 GB" in memory
    assert "total 24.0 GB" in memory
    device = page.inner_text("[data-testid=device]")
    assert "mode coding" in device
    assert "big-70b" in device
    lifecycle = page.inner_text("[data-testid=lifecycle]")
    assert "mistral-7b" in lifecycle
    assert "ttl" in lifecycle
    request = page.inner_text("[data-testid=request]")
    assert "planner" in request
    assert "210 ms" in request

    page.click("[data-testid=instance][data-model=coder-7b] [data-testid=unload]")
    page.wait_for_selector("[data-testid=error]:has-text('coder-7b is pinned')")
    assert "HTTP 409" in page.inner_text("[data-testid=error]")
