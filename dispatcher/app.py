"""The dispatcher's aiohttp app: routes, middlewares, and what it owns for its lifetime."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from dispatcher import dashboard, handlers, routing_table
from dispatcher.access_log import AccessLog
from dispatcher.admin import setup_admin_routes
from dispatcher.appkeys import DISPATCHER_KEY, Dispatcher
from dispatcher.auth import auth_middleware
from dispatcher.buffering import Buffer
from dispatcher.classifier import Classifier
from dispatcher.config import DispatcherConfig
from dispatcher.cooldown import CooldownPolicy
from dispatcher.events import EVENTS_KEY, EventHub
from dispatcher.forwarding import OPENAI_PATHS, Forwarder
from dispatcher.metrics import Metrics
from dispatcher.registry import Registry
from dispatcher.request_routing import RequestRouting
from dispatcher.router import Router
from dispatcher.views import cluster_nodes
from rolemesh.cors import setup_cors
from rolemesh.http import error_middleware, request_context_middleware

log = structlog.get_logger("dispatcher.app")

MAX_EXPIRY_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Deps:
    """What the app takes from outside, so tests can bring their own."""

    clock: Callable[[], float] = time.monotonic
    expiry_interval_s: float | None = None  # None: a quarter of node_timeout_s, at most 1 s


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_post("/v1/nodes/register", handlers.register)
    app.router.add_post("/v1/nodes/heartbeat", handlers.heartbeat)
    app.router.add_post("/v1/nodes/deregister", handlers.deregister)
    app.router.add_get("/v1/nodes", handlers.list_nodes)
    app.router.add_get("/v1/nodes/{node_id}", handlers.get_node)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/v1/route", handlers.route)
    setup_admin_routes(app)
    app.router.add_get("/v1/routing", routing_table.get_routing)
    app.router.add_put("/v1/routing", routing_table.put_routing)
    for path in OPENAI_PATHS:
        app.router.add_post(path, handlers.openai_request)
    dashboard.setup_routes(app)  # the page, /v1/events, node logs


def build_app(config: DispatcherConfig, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    registry = Registry(timeout_s=config.timeout_s, forget_s=config.forget_s,
                        default_load_s=config.default_load_s, clock=deps.clock)
    policy = config.cost_model.policy(memory_safety_margin=config.vram_safety_margin,
                                      busy_retry_after_s=config.busy_retry_after_s)
    router = Router(registry, config.aliases, policy)
    metrics = Metrics(registry)
    forwarder = Forwarder(
        registry, router, metrics, cluster_token=config.cluster_token,
        max_attempts=config.max_attempts, max_body_bytes=config.max_body_bytes,
        connect_timeout_s=config.connect_timeout_s, request_timeout_s=config.request_timeout_s,
        busy_retry_after_s=config.busy_retry_after_s,
        first_byte_timeout_s=config.first_byte_timeout_s,
        stream_idle_timeout_s=config.stream_idle_timeout_s,
        cooldown=CooldownPolicy(config.cooldown_after_failures, config.cooldown_s,
                                config.cooldown_max_s), clock=deps.clock)
    forwarder.buffer = Buffer(config.max_buffered_requests, config.buffer_timeout_s,
                              clock=deps.clock)
    registry.listeners.append(forwarder.buffer.wake)
    app = web.Application(
        middlewares=[request_context_middleware, error_middleware,
                     auth_middleware(config.cluster_token, config.api_keys,
                                     config.admin_keys)],
        client_max_size=config.max_body_bytes)
    app[DISPATCHER_KEY] = Dispatcher(config, registry, router, metrics, forwarder)
    if config.access_log is not None:
        forwarder.access_log = AccessLog(config.access_log)
    hub = forwarder.events = app[EVENTS_KEY] = EventHub(
        lambda: {"nodes": cluster_nodes(registry.snapshot()).model_dump(mode="json")["data"]})
    store = app[routing_table.ROUTING_KEY] = routing_table.RoutingTableStore.at_start(
        config.routing, Path(config.routing_file) if config.routing_file else None)
    forwarder.routing = RequestRouting(store, router, Classifier(forwarder.call))
    app[routing_table.EDITORS_KEY] = (
        *(config.admin_keys or []), *([config.cluster_token] if config.cluster_token else []))
    app[routing_table.SERVED_KEY] = lambda: (router.catalog().servable_names(),
                                             config.aliases)
    setup_routes(app)
    setup_cors(app, config.cors_allowed_origins)
    interval = deps.expiry_interval_s or min(MAX_EXPIRY_INTERVAL_S, config.timeout_s / 4)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await forwarder.start()
        forwarder.access_log.start()
        expiry = asyncio.create_task(expire_nodes(registry, interval, hub))
        log.info("dispatcher.started", host=config.listen_host, port=config.listen_port,
                 node_timeout_s=config.timeout_s, node_forget_s=config.forget_s,
                 aliases=sorted(config.aliases), client_auth=config.api_keys is not None)
        for key in config.deprecated_keys:
            log.warning("config.deprecated_key", key=key, use="aliases",
                        message="'roles:' in the dispatcher config holds aliases: rename it "
                                "to 'aliases:'")
        if not config.cluster_token:
            log.warning("dispatcher.no_cluster_token",
                        message="any host that reaches this port can register as a node")
        yield
        expiry.cancel()
        await asyncio.gather(expiry, return_exceptions=True)
        await forwarder.close()
        forwarder.access_log.close()
        log.info("dispatcher.stopped")

    app.cleanup_ctx.append(lifetime)
    return app


async def expire_nodes(registry: Registry, interval_s: float,
                       hub: EventHub | None = None) -> None:
    """Mark silent nodes down, then forget them (the registry logs each change)."""
    while True:
        await asyncio.sleep(interval_s)
        for change in registry.expire():
            if hub is not None:
                hub.node_gone(change.node_id, change.change, "missed heartbeats")
