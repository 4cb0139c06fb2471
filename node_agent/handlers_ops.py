"""Operator endpoints of the agent: `GET /metrics` and llama-server's own output, and the
middleware that counts OpenAI requests for the metrics.

    GET /v1/node/logs?device=D[&model=M][&lines=N]    {"device", "model", "lines": [...]}
    GET /v1/node/logs?device=D[&model=M]&follow=1     SSE: the kept lines, then each new one

The logs come from a `LogSource`, which the node object implements over its instances:
with several models on a device, `model=` names the one (else 404 asks for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

import structlog
from aiohttp import web

from node_agent.appkeys import NODE_KEY
from node_agent.metrics import CONTENT_TYPE, AgentMetrics
from rolemesh.errors import BadRequest, NotFound, RoleMeshError, UnknownDevice
from rolemesh.http import CLIENT_GONE_KEY, json_response
from rolemesh.openai_body import OPENAI_PATHS

METRICS_KEY = web.AppKey("agent_metrics", AgentMetrics)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FOLLOW_KEEPALIVE_S = 15.0


class NoInstance(NotFound):
    code = "instance_not_found"


@runtime_checkable
class LogSource(Protocol):
    """Where an instance's llama-server output can be read (the node implements it)."""

    def log_lines(self, device: str, model: str | None) -> list[str] | None:
        """The kept lines of the instance of `model` (None: the device's only one) on
        `device`; None when no such instance runs."""

    def subscribe(self, device: str, model: str | None
                  ) -> contextlib.AbstractContextManager[asyncio.Queue[str | None]] | None:
        """A queue of the lines printed from now on (None in it: the output ended); None
        when no such instance runs."""


def log_source(app: web.Application) -> LogSource:
    return app[NODE_KEY]


def setup_routes(app: web.Application) -> None:
    """Called from the agent's setup_routes: adds the routes and the metrics they serve."""
    metrics = app[METRICS_KEY] = AgentMetrics()

    def devices() -> tuple[str, list[Any]]:
        node = app[NODE_KEY]
        return node.config.node_id, [node.device_status(d) for d in node.device_ids]
    metrics.read_devices_from(devices)
    app.middlewares.append(count_requests)  # innermost: it sees what the handler bound
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/v1/node/logs", logs)


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Each OpenAI request's endpoint, model (as the handler bound it), outcome, duration,
    and llama-server's `timings` from a buffered answer; the core adds what only it sees
    (time to first token, loads, stops) through AgentMetrics."""
    if request.path not in OPENAI_PATHS:
        return await handler(request)
    metrics = request.app[METRICS_KEY]
    started = time.perf_counter()
    outcome = "client_gone"
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        outcome = ("client_gone" if request.get(CLIENT_GONE_KEY)
                   else "ok" if response.status < 400 else "upstream_error")
        return response
    except RoleMeshError as err:
        outcome = err.code
        raise
    finally:
        bound = structlog.contextvars.get_contextvars()
        model = str(bound.get("model") or "-")
        metrics.request(request.path, model, str(bound.get("role") or "-"), outcome)
        metrics.latency(request.path, model, time.perf_counter() - started)
        body = getattr(response, "body", None)
        if outcome == "ok" and isinstance(body, bytes) and b'"timings"' in body:
            metrics.timings(model, body)


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _lines_wanted(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise BadRequest(f"lines={value!r} is not a number") from None
    if n < 0:
        raise BadRequest("lines must be 0 or more")
    return n


async def logs(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    device = request.query.get("device") or (node.device_ids[0]
                                             if len(node.device_ids) == 1 else "")
    if not device:
        raise BadRequest("name the device: /v1/node/logs?device=gpu:0[&model=M]")
    if device not in node.device_ids:
        raise UnknownDevice(f"{device!r} is not a device of node {node.config.node_id!r} "
                            f"({', '.join(node.device_ids)})")
    model = request.query.get("model") or None
    last = _lines_wanted(request.query.get("lines"))
    source = log_source(request.app)
    lines = source.log_lines(device, model)
    if lines is None:
        what = f"{model} on {device}" if model else f"any model on {device}"
        raise NoInstance(f"no llama-server runs {what} now")
    if last is not None:
        lines = lines[-last:] if last else []
    if request.query.get("follow") not in ("1", "true", "yes"):
        return json_response({"node_id": node.config.node_id, "device": device,
                              "model": model, "lines": lines})
    subscription = source.subscribe(device, model)
    if subscription is None:
        raise NoInstance(f"the llama-server on {device} just stopped")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    with subscription as queue:
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            for line in lines:
                await response.write(_sse(line))
            async for line in _follow(queue):
                await response.write(b": keep-alive\n\n" if line is None else _sse(line))
            await response.write(b"event: end\ndata: {}\n\n")
    return response


async def _follow(queue: asyncio.Queue[str | None]) -> Any:
    while True:
        try:
            line = await asyncio.wait_for(queue.get(), FOLLOW_KEEPALIVE_S)
        except TimeoutError:
            yield None
            continue
        if line is None:
            return
        yield line


def _sse(line: str) -> bytes:
    return b"data: " + json.dumps({"line": line}).encode() + b"\n\n"
