"""The operator's page: static files shipped in the package, the event stream, node logs.

`GET /` and `GET /routing` are plain files (no build step; `dispatcher/static/`); all they
show comes from the API with the key the operator typed in, so the files themselves are
open. `GET /v1/nodes/{node_id}/logs` relays an agent's `GET /v1/node/logs` (the dispatcher
holds the cluster token; the page never sees it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from dispatcher.appkeys import DISPATCHER_KEY
from dispatcher.events import EVENTS_KEY, serve_events
from rolemesh import headers
from rolemesh.errors import NodeNotFound, UpstreamFailed

STATIC = Path(__file__).parent / "static"
LOG_QUERY_KEYS = ("device", "model", "lines", "follow")


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", page("index.html"))
    app.router.add_get("/routing", page("routing.html"))
    app.router.add_static("/ui/", STATIC, append_version=False)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/v1/nodes/{node_id}/logs", node_logs)


def page(name: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    path = STATIC / name

    async def serve(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})
    return serve


async def events(request: web.Request) -> web.StreamResponse:
    return await serve_events(request, request.app[EVENTS_KEY])


async def node_logs(request: web.Request) -> web.StreamResponse:
    d = request.app[DISPATCHER_KEY]
    node_id = request.match_info["node_id"]
    node = d.registry.node(node_id)
    if node is None:
        raise NodeNotFound(f"no node {node_id!r} is registered")
    query = {k: v for k, v in request.query.items() if k in LOG_QUERY_KEYS}
    out = {}
    if d.config.cluster_token:
        out[headers.AUTHORIZATION] = f"Bearer {d.config.cluster_token}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    # A session of its own: a followed log can stay open for hours, off the request pool.
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            upstream = await http.get(node.url + "/v1/node/logs", params=query, headers=out)
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"node {node_id!r} did not answer: {exc}") from exc
        response = web.StreamResponse(status=upstream.status, headers={
            "Content-Type": upstream.headers.get("Content-Type", "application/json"),
            "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, ConnectionResetError):
            pass  # the agent or the page went away: the relay ends
        finally:
            upstream.close()
        return response
