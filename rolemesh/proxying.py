"""Forwarding an OpenAI request's bytes to an upstream and its answer back, unbuffered.

Shared by the node agent (agent -> llama-server) and usable by the dispatcher. The body
goes out untouched; an SSE answer goes back chunk by chunk as it arrives, and if the
upstream breaks after the first byte the client gets a terminal SSE error event instead
of a silent hang or a truncated stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from rolemesh.errors import GatewayTimeout, UpstreamFailed

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                        "content-encoding", "server", "date"})


def sse_error_event(message: str, code: str = "upstream_failed",
                    type_: str = "server_error") -> bytes:
    payload = {"error": {"message": message, "type": type_, "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _copy_headers(upstream: aiohttp.ClientResponse, extra: Mapping[str, str]) -> dict[str, str]:
    # CORS headers come from this service's config (rolemesh.cors), never from upstream:
    # llama-server sends an empty Access-Control-Allow-Origin on every answer.
    out = {k: v for k, v in upstream.headers.items()
           if k.lower() not in HOP_BY_HOP and not k.lower().startswith("access-control-")}
    out.update(extra)
    return out


async def open_upstream(http: aiohttp.ClientSession, url: str, body: bytes,
                        headers: Mapping[str, str],
                        timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    """POST and wait for the status line; connection failures become UpstreamFailed."""
    try:
        return await http.post(url, data=body, headers=headers, timeout=timeout)
    except TimeoutError as exc:
        raise GatewayTimeout(f"the upstream did not answer in time ({url})") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamFailed(f"the upstream failed before answering: {exc}") from exc


async def read_whole(upstream: aiohttp.ClientResponse) -> bytes:
    try:
        return await upstream.read()
    except TimeoutError as exc:
        raise GatewayTimeout("the upstream stopped answering mid-response") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamFailed(f"the upstream failed mid-response: {exc}") from exc
    finally:
        upstream.release()


def buffered_response(upstream: aiohttp.ClientResponse, body: bytes,
                      extra_headers: Mapping[str, str]) -> web.Response:
    return web.Response(body=body, status=upstream.status,
                        headers=_copy_headers(upstream, extra_headers))


async def stream_back(request: web.Request, upstream: aiohttp.ClientResponse,
                      extra_headers: Mapping[str, str]) -> web.StreamResponse:
    """Relay the upstream's body to the client as it arrives.

    Returns once the upstream ended or broke (a terminal SSE error then ends the stream);
    a client that goes away raises ConnectionResetError and the upstream is closed, which
    makes llama-server cancel the generation.
    """
    response = web.StreamResponse(status=upstream.status,
                                  headers=_copy_headers(upstream, extra_headers))
    clean = False
    try:
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            message = ("the upstream stopped answering" if isinstance(exc, asyncio.TimeoutError)
                       else f"the upstream failed mid-stream: {exc}")
            await response.write(sse_error_event(message))
        else:
            clean = True
        await response.write_eof()
    finally:
        # A cleanly finished upstream goes back to the keep-alive pool; any other ending
        # closes it so the upstream notices and stops generating.
        if clean:
            upstream.release()
        else:
            upstream.close()
    return response
