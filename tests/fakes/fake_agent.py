"""A fake RoleMesh node agent, and a harness that runs a real dispatcher app beside it.

The fake speaks the agent's side of the wire contract: it registers and heartbeats when
told to (tests drive it, so nothing depends on timers), answers the OpenAI endpoints, honours
`X-RoleMesh-Device` / `X-RoleMesh-Model`, requires the cluster token when it has one, and
sets the device state headers on every answer. Knobs make it misbehave: answer 503
`device_busy` or `model_not_ready`, hold answers until an event is set, stream N chunks and
wait between them on an event, drop the connection before answering or mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from dispatcher.app import Deps, build_app
from dispatcher.appkeys import DISPATCHER_KEY, Dispatcher
from dispatcher.config import DispatcherConfig
from rolemesh import headers
from rolemesh.api import (
    DeviceStatus,
    HeartbeatRequest,
    InstanceState,
    InstanceStatus,
    ModelStatus,
    NodeInventory,
    RegisterRequest,
)
from rolemesh.errors import error_body
from rolemesh.openai_body import OPENAI_PATHS


@dataclass
class FakeDevice:
    device_id: str = "gpu:0"
    memory_total_mb: int | None = 24000
    loaded: list[str] = field(default_factory=list)  # resident models, all ready
    pending_limit: int = 2
    reported_in_flight: int = 0  # added to the live count in reports (traffic from elsewhere)
    in_flight: int = 0  # live: requests this fake is answering now
    serving: dict[str, int] = field(default_factory=dict)  # live, per model
    one_at_a_time: bool = False  # a model it serves replaces the residents (co_residency off)

    def residents_header(self) -> str:
        return ",".join(f"{m}={InstanceState.READY.value}" for m in self.loaded)


@dataclass
class FakeModel:
    model_id: str
    roles: list[str] = field(default_factory=list)
    memory_need_mb: int = 4000
    last_load_s: float | None = None
    recent_requests: int = 0
    ctx_size: int | None = None


@dataclass
class Knobs:
    busy: bool = False  # answer 503 device_busy
    not_ready: bool = False  # answer 503 model_not_ready
    retry_after_s: int = 2
    hold: asyncio.Event | None = None  # answers wait for this before they start
    stream_chunks: int = 3
    stream_gate: asyncio.Event | None = None  # after the first chunk, wait for this
    die_after_chunks: int | None = None  # drop the connection after this many chunks
    drop_before_answer: bool = False  # drop the connection without answering
    answer_text: str | None = None  # the answer's content instead of node/device/model
    bad_gateway: bool = False  # answer 502 upstream_failed (its llama-server died first)
    error_event_after_chunks: int | None = None  # end the stream with an SSE error event


@dataclass(frozen=True)
class Seen:
    """One OpenAI request as the fake received it."""

    path: str
    body: dict[str, Any]
    device: str | None
    model_header: str | None
    request_id: str | None
    authorization: str | None


class FakeAgent:
    def __init__(self, node_id: str, devices: list[FakeDevice], models: list[FakeModel], *,
                 cluster_token: str | None = None) -> None:
        self.node_id = node_id
        self.devices = {d.device_id: d for d in devices}
        self.models = {m.model_id: m for m in models}
        self.cluster_token = cluster_token
        self.knobs = Knobs()
        self.seen: list[Seen] = []
        self.seq = 0
        self.url = ""  # set by start(), or by a test for an agent that is not running
        self._runner: web.AppRunner | None = None

    # -- what it reports -------------------------------------------------------------------

    def device_status(self, d: FakeDevice) -> DeviceStatus:
        instances = []
        for i, m in enumerate(d.loaded):
            need = self.models[m].memory_need_mb if m in self.models else 0
            others = d.reported_in_flight if i == 0 else 0  # traffic from elsewhere: the first
            instances.append(InstanceStatus(
                model_id=m, devices=[d.device_id], state=InstanceState.READY,
                in_flight=d.serving.get(m, 0) + others, memory_charged_mb=need,
                memory_estimated_mb=need))
        used = sum(i.memory_charged_mb for i in instances)
        total = d.memory_total_mb
        return DeviceStatus(
            device_id=d.device_id, name=f"Fake {d.device_id}", backend="cuda",
            memory_total_mb=total, memory_used_mb=used if total is not None else None,
            memory_free_mb=total - used if total is not None else None,
            memory_charged_mb=used, instances=instances,
            in_flight=d.in_flight + d.reported_in_flight, pending=0,
            pending_limit=d.pending_limit)

    def model_statuses(self) -> list[ModelStatus]:
        return [ModelStatus(model_id=m.model_id, roles=m.roles, file_size_mb=m.memory_need_mb,
                            memory_need_mb=m.memory_need_mb, last_load_s=m.last_load_s,
                            recent_requests=m.recent_requests, ctx_size=m.ctx_size)
                for m in self.models.values()]

    def inventory(self) -> NodeInventory:
        self.seq += 1
        return NodeInventory(node_id=self.node_id, url=self.url, backend="cuda", seq=self.seq,
                             devices=[self.device_status(d) for d in self.devices.values()],
                             models=self.model_statuses())

    def heartbeat_request(self, *, seq: int | None = None) -> HeartbeatRequest:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return HeartbeatRequest(node_id=self.node_id, seq=seq,
                                devices=[self.device_status(d) for d in self.devices.values()],
                                models=self.model_statuses())

    def state_headers(self, d: FakeDevice) -> dict[str, str]:
        return {headers.NODE: self.node_id, headers.DEVICE: d.device_id,
                headers.RESIDENTS: d.residents_header(),
                headers.IN_FLIGHT: str(d.in_flight + d.reported_in_flight), headers.PENDING: "0"}

    # -- talking to a dispatcher -----------------------------------------------------------

    async def register(self, session: aiohttp.ClientSession, dispatcher_url: str,
                       token: str | None = None) -> int:
        payload = RegisterRequest(inventory=self.inventory()).model_dump_json()
        return await self._post(session, dispatcher_url + "/v1/nodes/register", payload, token)

    async def heartbeat(self, session: aiohttp.ClientSession, dispatcher_url: str,
                        token: str | None = None, *, seq: int | None = None) -> int:
        payload = self.heartbeat_request(seq=seq).model_dump_json()
        return await self._post(session, dispatcher_url + "/v1/nodes/heartbeat", payload, token)

    async def _post(self, session: aiohttp.ClientSession, url: str, payload: str,
                    token: str | None) -> int:
        h = {"Content-Type": "application/json"}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        async with session.post(url, data=payload, headers=h) as resp:
            await resp.read()
            return resp.status

    # -- serving ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        for path in OPENAI_PATHS:
            app.router.add_post(path, self._openai)
        return app

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node_id": self.node_id})

    def _error(self, status: int, code: str, message: str, extra: dict[str, str]
               ) -> web.Response:
        return web.Response(status=status, body=json.dumps(
            error_body(message, "server_error" if status >= 500 else "invalid_request_error",
                       code)).encode(), content_type="application/json", headers=extra)

    async def _openai(self, request: web.Request) -> web.StreamResponse:  # noqa: PLR0912 - one branch per fault knob
        body = await request.json()
        self.seen.append(Seen(
            path=request.path, body=body, device=request.headers.get(headers.DEVICE),
            model_header=request.headers.get(headers.MODEL),
            request_id=request.headers.get(headers.REQUEST_ID),
            authorization=request.headers.get("Authorization")))
        if self.cluster_token is not None and \
                request.headers.get("Authorization") != f"Bearer {self.cluster_token}":
            return self._error(401, "invalid_token", "bad cluster token", {})
        device = self.devices.get(request.headers.get(headers.DEVICE) or
                                  next(iter(self.devices)))
        if device is None:
            return self._error(400, "unknown_device", "no such device", {})
        name = body.get("model")
        models = ([name] if name in self.models else
                  [m.model_id for m in self.models.values() if name in m.roles])
        wanted = request.headers.get(headers.MODEL)
        if wanted and not models and wanted in self.models:
            models = [wanted]  # a name only the dispatcher knows (an alias), as the agent does
        elif wanted:
            models = [m for m in models if m == wanted]
        if not models:
            return self._error(404, "model_not_found", f"{name!r} is not served here",
                               self.state_headers(device))
        knobs = self.knobs
        if knobs.drop_before_answer:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if knobs.bad_gateway:
            return self._error(502, "upstream_failed", "fake: llama-server is gone",
                               self.state_headers(device))
        if knobs.busy or knobs.not_ready:
            code = "device_busy" if knobs.busy else "model_not_ready"
            return self._error(503, code, f"fake {code}", {
                **self.state_headers(device), "Retry-After": str(knobs.retry_after_s)})
        model = models[0]
        device.in_flight += 1
        device.serving[model] = device.serving.get(model, 0) + 1
        try:
            if knobs.hold is not None:
                await knobs.hold.wait()
            if device.one_at_a_time:
                device.loaded = [model]
            elif model not in device.loaded:
                device.loaded.append(model)
            text = knobs.answer_text or f"{self.node_id}/{device.device_id}/{model}"
            if body.get("stream"):
                return await self._stream(request, device, text)
        finally:
            device.in_flight -= 1
            device.serving[model] -= 1
        answer = {"id": "chatcmpl-fake", "object": "chat.completion", "model": models[0],
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": text}}]}
        return web.json_response(answer, headers=self.state_headers(device))

    async def _stream(self, request: web.Request, device: FakeDevice, text: str
                      ) -> web.StreamResponse:
        knobs = self.knobs
        response = web.StreamResponse(headers={**self.state_headers(device),
                                               "Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(knobs.stream_chunks):
            if knobs.error_event_after_chunks is not None and i == knobs.error_event_after_chunks:
                await response.write(b'data: {"error": {"message": "fake crash", '
                                     b'"type": "server_error", "code": "upstream_failed"}}\n\n')
                await response.write_eof()
                return response
            if knobs.die_after_chunks is not None and i == knobs.die_after_chunks:
                assert request.transport is not None
                request.transport.close()
                return response
            chunk = {"object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": f"{text}#{i} "}}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if i == 0 and knobs.stream_gate is not None:
                await knobs.stream_gate.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


# -- a dispatcher app on a loopback port ---------------------------------------------------


@dataclass
class RunningDispatcher:
    url: str
    app: web.Application

    @property
    def state(self) -> Dispatcher:
        return self.app[DISPATCHER_KEY]


def dispatcher_config(**overrides: Any) -> DispatcherConfig:
    # Buffering off unless a test turns it on (tests/component/test_dispatcher_buffering.py):
    # a busy fake answers 503 at once, and these tests check that answer.
    data: dict[str, Any] = {"listen_port": 0, "log_format": "console",
                            "max_buffered_requests": 0}
    data.update(overrides)
    return DispatcherConfig.model_validate(data)


@contextlib.asynccontextmanager
async def running_dispatcher(config: DispatcherConfig | None = None,
                             deps: Deps | None = None) -> AsyncIterator[RunningDispatcher]:
    app = build_app(config or dispatcher_config(), deps)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield RunningDispatcher(f"http://127.0.0.1:{runner.addresses[0][1]}", app)
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_agents(*agents: FakeAgent) -> AsyncIterator[tuple[FakeAgent, ...]]:
    try:
        for agent in agents:
            await agent.start()
        yield agents
    finally:
        for agent in agents:
            await agent.stop()


def chat(model: str, *, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
