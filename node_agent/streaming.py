"""A streamed answer that may have to wait for a load first.

While a streamed request waits for its model to load, the client gets SSE comment lines
(`: loading MODEL, 12 s`) every few seconds after the first couple: OpenAI clients ignore
comments, a client that wants to show progress can read them, and the dispatcher sees bytes
flowing, so a slow load is not mistaken for a dead host. A quick answer (or a quick
refusal) sends nothing early, so its status code still tells the dispatcher to fail over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import TypeVar

import aiohttp
from aiohttp import web

from rolemesh.errors import RoleMeshError
from rolemesh.proxying import HOP_BY_HOP, sse_error_event

T = TypeVar("T")

LOADING_COMMENT_AFTER_S = 2.0
LOADING_COMMENT_EVERY_S = 3.0
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class EarlyStream:
    """The SSE response, opened before the answer exists when a load takes a while."""

    def __init__(self, request: web.Request, model_id: str) -> None:
        self.request = request
        self.model_id = model_id
        self.response: web.StreamResponse | None = None

    async def wait(self, awaitable: Awaitable[T], headers: Mapping[str, str]) -> T:
        """Await `awaitable`, sending loading comments while it takes long."""
        task = asyncio.ensure_future(awaitable)
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = LOADING_COMMENT_AFTER_S
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=timeout)
                if done:
                    return task.result()
                if self.response is None:
                    self.response = web.StreamResponse(status=200,
                                                       headers={**SSE_HEADERS, **headers})
                    await self.response.prepare(self.request)
                elapsed = int(loop.time() - started)
                await self.response.write(
                    f": loading {self.model_id}, {elapsed} s\n\n".encode())
                timeout = LOADING_COMMENT_EVERY_S
        except BaseException:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            raise

    async def fail(self, err: RoleMeshError) -> web.StreamResponse:
        """End an opened stream with one error event (the status line is already sent)."""
        assert self.response is not None
        await self.response.write(sse_error_event(err.message, err.code, err.type))
        await self.response.write_eof()
        return self.response

    async def relay(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Relay the upstream's SSE body into the opened stream."""
        assert self.response is not None
        clean = False
        try:
            if upstream.status != 200:
                body = await upstream.read()
                await self.response.write(
                    b"data: " + (body.strip() or b'{"error": {"message": "upstream error", '
                                 b'"type": "server_error", "code": "upstream_failed"}}')
                    + b"\n\n")
            else:
                try:
                    async for chunk in upstream.content.iter_any():
                        await self.response.write(chunk)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    await self.response.write(
                        sse_error_event(f"the upstream failed mid-stream: {exc}"))
                else:
                    clean = True
            await self.response.write_eof()
        finally:
            if clean:
                upstream.release()
            else:
                upstream.close()
        return self.response


def copy_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
