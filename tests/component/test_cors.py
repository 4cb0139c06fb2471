"""CORS is configuration: off by default (no header at all, not an empty one), on for the
listed origins, preflights answered before auth; upstream CORS headers never pass."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from tests.fakes.fake_agent import (
    FakeAgent,
    FakeDevice,
    FakeModel,
    chat,
    dispatcher_config,
    running_dispatcher,
)


async def upstream_with_empty_cors_header(fake: FakeAgent) -> web.AppRunner:
    """An agent whose answers carry llama-server's empty Access-Control-Allow-Origin."""
    async def answer(request: web.Request) -> web.Response:
        d = fake.devices["gpu:0"]
        return web.json_response({"choices": []}, headers={
            **fake.state_headers(d), "Access-Control-Allow-Origin": ""})
    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return runner


async def test_without_config_answers_carry_no_cors_header_even_when_upstream_sends_one():
    fake = FakeAgent("node-a", [FakeDevice("gpu:0", loaded=["m"])], [FakeModel("m", ["chat"])])
    runner = await upstream_with_empty_cors_header(fake)
    try:
        async with running_dispatcher() as d, aiohttp.ClientSession() as s:
            assert await fake.register(s, d.url) == 200
            async with s.post(d.url + "/v1/chat/completions", json=chat("chat"),
                              headers={"Origin": "http://ui.lan"}) as resp:
                assert resp.status == 200
                assert "Access-Control-Allow-Origin" not in resp.headers
    finally:
        await runner.cleanup()


async def test_listed_origins_get_cors_headers_and_preflights_need_no_key():
    config = dispatcher_config(cors_allowed_origins=["http://ui.lan"], api_keys=["sk-1"])
    async with running_dispatcher(config) as d, aiohttp.ClientSession() as s:
        async with s.options(d.url + "/v1/chat/completions", headers={
                "Origin": "http://ui.lan", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"}) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.lan"
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        async with s.get(d.url + "/v1/models", headers={
                "Origin": "http://ui.lan", "Authorization": "Bearer sk-1"}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.lan"
        async with s.get(d.url + "/v1/models", headers={"Origin": "http://ui.lan"}) as resp:
            assert resp.status == 401  # CORS opens the door to browsers, not to everyone
            assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.lan"
        async with s.get(d.url + "/v1/models", headers={
                "Origin": "http://evil.example", "Authorization": "Bearer sk-1"}) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
