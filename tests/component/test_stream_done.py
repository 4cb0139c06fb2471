"""A client that leaves at `data: [DONE]` (as OpenAI's SDK does) got the whole answer.

Real aiohttp servers on loopback: an upstream that sends an SSE answer and holds back its end
of body until told, and a relay in front of it using rolemesh.proxying.relay_stream.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from rolemesh.proxying import Relayed, StreamEnd, relay_stream
from tests.waiting import wait_until


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_a_client_leaving_after_done_is_a_clean_end_and_the_upstream_finishes():
    gate = asyncio.Event()
    upstream_done: list[str] = []
    relayed: list[Relayed] = []

    async def upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n')
            await resp.write(b"data: [DONE]\n\n")
            await gate.wait()  # its end of body comes late, as under load
            await resp.write_eof()
            upstream_done.append("complete")
        except asyncio.CancelledError:
            upstream_done.append("cancelled")
            raise
        return resp

    up_app = web.Application()
    up_app.router.add_post("/v1/chat/completions", upstream)
    up_runner, up_url = await serve(up_app)
    session = aiohttp.ClientSession()

    async def relay(request: web.Request) -> web.StreamResponse:
        resp = await session.post(up_url + request.path, data=await request.read())
        result = await relay_stream(request, resp, {})
        relayed.append(result)
        return result.response

    relay_app = web.Application()
    relay_app.router.add_post("/v1/chat/completions", relay)
    relay_runner, relay_url = await serve(relay_app)
    try:
        async with aiohttp.ClientSession() as client:
            resp = await client.post(relay_url + "/v1/chat/completions", json={"stream": True})
            seen = b""
            while not seen.endswith(b"data: [DONE]\n\n"):
                seen += await resp.content.readany()
            resp.close()  # gone at [DONE], before the upstream's end of body
        await wait_until(lambda: bool(relayed), what="the relay to finish")
        assert relayed[0].end is StreamEnd.CLEAN
        gate.set()
        await wait_until(lambda: bool(upstream_done), what="the upstream to finish")
        assert upstream_done == ["complete"]  # read to its end, not cut off
    finally:
        gate.set()
        await session.close()
        await relay_runner.cleanup()
        await up_runner.cleanup()
