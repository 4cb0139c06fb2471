"""The agent's aiohttp app: routes, middlewares, and what it owns for its lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from node_agent import handlers, handlers_ops
from node_agent.appkeys import HTTP_KEY, NODE_KEY, UPSTREAM_TIMEOUT_KEY
from node_agent.backends import DeviceBackend
from node_agent.backends.select import with_cpu_device
from node_agent.config import NodeAgentConfig
from node_agent.handlers_ops import METRICS_KEY
from node_agent.launcher import LlamaLauncher
from node_agent.metrics import scheduler_listener
from node_agent.node import ModelFacts, Node
from node_agent.pidfiles import PidFiles
from node_agent.registration import deregister, run_registration
from node_agent.scheduler import NodeScheduler
from rolemesh.cors import setup_cors
from rolemesh.errors import Unauthorized
from rolemesh.http import error_middleware, request_context_middleware, token_matches
from rolemesh.net import free_loopback_port
from rolemesh.openai_body import OPENAI_PATHS

log = structlog.get_logger("node_agent.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health"})



def auth_middleware(token: str | None) -> Middleware:
    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.path not in OPEN_PATHS and \
                not token_matches(request, token):
            raise Unauthorized("this node agent needs 'Authorization: Bearer "
                               "<cluster_token>'")
        return await handler(request)
    return check_token


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/v1/node/inventory", handlers.inventory)
    app.router.add_get("/v1/route", handlers.route)
    app.router.add_post("/v1/models/{model}/load", handlers.load_model)
    app.router.add_post("/v1/models/{model}/unload", handlers.unload_model)
    app.router.add_post("/v1/node/drain", handlers.drain)
    app.router.add_post("/v1/node/undrain", handlers.undrain)
    app.router.add_post("/v1/node/mode", handlers.set_mode)
    app.router.add_post("/v1/node/optimize", handlers.optimize)
    for path in OPENAI_PATHS:
        app.router.add_post(path, handlers.openai_request)
    handlers_ops.setup_routes(app)  # /metrics, /v1/node/logs


def build_app(config: NodeAgentConfig, backend: DeviceBackend, facts: dict[str, ModelFacts],
              binary: str) -> web.Application:
    if config.cpu_device:
        backend = with_cpu_device(backend)
    app = web.Application(
        middlewares=[request_context_middleware, error_middleware,
                     auth_middleware(config.cluster_token)],
        client_max_size=config.max_body_bytes)
    setup_routes(app)
    setup_cors(app, config.cors_allowed_origins)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None))
        pidfiles = PidFiles(config.state_dir, config.node_id)
        pidfiles.reap_orphans()
        wanted = config.devices
        figures = [d for d in backend.devices() if wanted is None or d.device_id in wanted]
        # Best first: where a pinned or preloaded model goes (GPUs by size, the CPU last).
        figures.sort(key=lambda d: (d.device_id == "cpu", -(d.memory_total_mb or 0),
                                    d.device_id))
        device_ids = [d.device_id for d in figures]
        missing = sorted(set(wanted or ()) - set(device_ids))
        missing += sorted({d for m in config.models for d in (m.devices or ())}
                          - set(device_ids) - set(missing))
        if missing:
            raise RuntimeError(f"devices: {', '.join(missing)} not found by the "
                               f"{backend.name} backend (or left out by devices:)")
        node = Node(config, backend, device_ids, facts)
        launcher = LlamaLauncher(
            Path(binary), {d.device_id: dict(d.pin_env) for d in figures}, http, pidfiles,
            free_loopback_port, startup_timeout_s=config.llama_server_startup_timeout_s,
            probe_interval_s=config.llama_server_probe_interval_s)
        scheduler = NodeScheduler(config, device_ids, node.budgets,
                                  {m: f.memory_need_mb for m, f in facts.items()}, launcher,
                                  queue_timeout_s=config.request_timeout_s,
                                  need_of=node.need_of)
        scheduler.on_ready = node.measure
        scheduler.before_start = node.wait_for_memory
        node.attach(scheduler)
        scheduler.listeners.append(scheduler_listener(app[METRICS_KEY]))
        app[NODE_KEY] = node
        app[HTTP_KEY] = http
        app[UPSTREAM_TIMEOUT_KEY] = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=config.request_timeout_s)
        registration = (asyncio.create_task(run_registration(node, http))
                        if config.dispatcher_base_url else None)
        scheduler.start()
        log.info("agent.started", node_id=config.node_id, backend=backend.name,
                 devices=device_ids, models=[m.model_id for m in config.models],
                 url=config.url, llama_server=binary)
        yield
        if registration is not None:
            registration.cancel()
            await asyncio.gather(registration, return_exceptions=True)
            await deregister(node, http)  # routed nowhere from now on, not after a timeout
        await scheduler.shutdown()
        await http.close()
        backend.close()
        log.info("agent.stopped", node_id=config.node_id)

    app.cleanup_ctx.append(lifetime)
    return app
