"""Requests aiohttp cannot parse still get the OpenAI error shape (rolemesh.http_server)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from dispatcher.app import build_app
from rolemesh.http_server import JsonErrorAppRunner
from tests.fakes.fake_agent import dispatcher_config


async def raw_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: deflate\r\n"
    b"Content-Length: 1\r\n\r\n\x00",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: \x00\r\n"
    b"Content-Length: 0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n",
], ids=["body-that-does-not-decode", "control-character-in-a-header", "bad-length"])
async def test_a_request_that_is_not_valid_http_gets_a_json_400(request_bytes, caplog):
    runner = JsonErrorAppRunner(build_app(dispatcher_config()), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        status, body = await raw_exchange(runner.addresses[0][1], request_bytes)
    finally:
        await runner.cleanup()
    assert status == 400
    assert json.loads(body)["error"]["code"] == "malformed_request"
    assert "Error handling request" not in caplog.text
