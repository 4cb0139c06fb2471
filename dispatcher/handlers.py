"""The dispatcher's HTTP handlers: thin; the registry, router and forwarder do the work."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError
from yarl import URL

from dispatcher.appkeys import DISPATCHER_KEY
from dispatcher.events import EVENTS_KEY
from dispatcher.metrics import CONTENT_TYPE
from dispatcher.node_urls import node_id_problem, node_url_problem
from dispatcher.request_routing import features_from_query
from dispatcher.roles import model_list
from dispatcher.views import cluster_node, cluster_nodes
from rolemesh.api import (
    SCHEMA_VERSION,
    DeregisterRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    NodeState,
    RegisterRequest,
    RegisterResponse,
)
from rolemesh.errors import BadRequest, InvalidJSON, NodeNotFound
from rolemesh.http import json_response, read_body

WireT = TypeVar("WireT", bound=BaseModel)


def parse_wire(model: type[WireT], body: bytes) -> WireT:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise InvalidJSON(f"the request body is not valid JSON: {errors[0]['msg']}") from exc
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}"
                             for e in errors[:5])
        raise BadRequest(f"not a valid {model.__name__}: {problems}") from exc


def parse_versioned(model: type[WireT], body: bytes, inventory: bool) -> WireT:
    """`parse_wire`, but a body of another schema version is refused by its number rather
    than by the first field it misreads. The version is looked for only when the body does
    not parse (the common, valid beat is decoded once)."""
    try:
        return parse_wire(model, body)
    except BadRequest:
        check_schema_version_first(body, inventory)
        raise


def check_schema_version_first(body: bytes, inventory: bool) -> None:
    """Refuse another schema version by its number, before its fields are misread."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return  # parse_wire says what is wrong with it
    if isinstance(data, dict) and inventory:
        data = data.get("inventory")
    if isinstance(data, dict):
        version = data.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, int) and version != SCHEMA_VERSION:
            check_schema_version(version)


def check_schema_version(version: int) -> None:
    if version != SCHEMA_VERSION:
        raise BadRequest(f"schema_version {version} is not supported; this dispatcher "
                         f"speaks {SCHEMA_VERSION}: upgrade the node agent and the dispatcher "
                         "together")


def check_node_url(url: str) -> None:
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"inventory.url {url!r} is not a URL") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise BadRequest(f"inventory.url {url!r} must be http(s)://host:port")


async def health(request: web.Request) -> web.Response:
    counts = request.app[DISPATCHER_KEY].registry.count_by_state()
    return json_response({"status": "ok", "nodes_up": counts[NodeState.UP],
                          "nodes_down": counts[NodeState.DOWN]})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[DISPATCHER_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def register(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER_KEY]
    body = await read_body(request, d.config.max_body_bytes)
    req = parse_versioned(RegisterRequest, body, inventory=True)
    check_schema_version(req.inventory.schema_version)
    check_node_url(req.inventory.url)
    problem = node_id_problem(req.inventory.node_id) or node_url_problem(
        req.inventory.url, allow_unsafe=d.config.allow_unsafe_node_urls)
    if problem is not None:
        raise BadRequest(problem)
    node = d.registry.register(req.inventory)
    d.metrics.registrations.inc()
    request.app[EVENTS_KEY].node_report(node.node_id, req.inventory.devices,
                                        getattr(req.inventory, "recent_stops", None))
    return json_response(RegisterResponse(
        node_id=node.node_id, heartbeat_interval_s=d.config.heartbeat_interval_s
    ).model_dump(mode="json"))


async def heartbeat(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER_KEY]
    body = await read_body(request, d.config.max_body_bytes)
    beat = parse_versioned(HeartbeatRequest, body, inventory=False)
    check_schema_version(beat.schema_version)
    accepted = d.registry.heartbeat(beat)  # NodeNotFound (404) makes the agent register
    d.metrics.heartbeats.labels(str(accepted).lower()).inc()
    if accepted:
        request.app[EVENTS_KEY].node_report(beat.node_id, beat.devices,
                                            getattr(beat, "recent_stops", None))
    return web.Response(body=_heartbeat_answer(accepted, d.config.heartbeat_interval_s),
                        content_type="application/json")


@lru_cache(maxsize=8)
def _heartbeat_answer(accepted: bool, interval_s: float) -> bytes:
    # One of two bodies, 200 times a second at 1,000 nodes: encoded once.
    return json.dumps(HeartbeatResponse(accepted=accepted, heartbeat_interval_s=interval_s)
                      .model_dump(mode="json")).encode()


async def deregister(request: web.Request) -> web.Response:
    """A node agent that stops says so (cluster token): it is forgotten at once instead of
    after its heartbeats go missing, so nothing is routed to it meanwhile."""
    d = request.app[DISPATCHER_KEY]
    beat = parse_wire(DeregisterRequest, await read_body(request, d.config.max_body_bytes))
    gone = d.registry.forget(beat.node_id, why="deregistered")
    if gone:
        request.app[EVENTS_KEY].node_gone(beat.node_id, "forgotten", "deregistered")
    return json_response({"node_id": beat.node_id, "forgotten": gone})


async def list_nodes(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER_KEY]
    snapshot = d.registry.snapshot()
    # "avoiding": devices cooling down after failures and suspect nodes (docs/reliability.md)
    return json_response({**cluster_nodes(snapshot).model_dump(mode="json"),
                          "avoiding": d.forwarder.avoiding()})


async def get_node(request: web.Request) -> web.Response:
    node_id = request.match_info["node_id"]
    snapshot = request.app[DISPATCHER_KEY].registry.snapshot()
    node = snapshot.nodes.get(node_id)
    if node is None:
        raise NodeNotFound(f"no node {node_id!r} is registered; known: "
                           f"{', '.join(sorted(snapshot.nodes)) or 'none'}")
    return json_response(cluster_node(snapshot, node).model_dump(mode="json"))


async def list_models(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER_KEY]
    catalog = d.router.catalog(up_only=True)
    routing = d.forwarder.routing
    task_types = routing.store.table.task_types if routing is not None else None
    return json_response(model_list(catalog, task_types).model_dump(mode="json",
                                                                   exclude_none=True))


async def route(request: web.Request) -> web.Response:
    name = request.query.get("model", "")
    d = request.app[DISPATCHER_KEY]
    if not name and "role" not in request.query:
        raise BadRequest("name a model, role or alias: /v1/route?model=NAME (and optionally "
                         "task_type, role, latency, images, tools, prompt_tokens, text)")
    routing = d.forwarder.routing
    avoiding = d.forwarder.avoiding()  # the forwarder leaves these out while others remain
    if routing is None:
        return json_response({**d.router.explain(name), "avoiding": avoiding})
    chosen = await routing.explain(features_from_query(request.query))
    return json_response({**d.router.explain(chosen["target"]), "routing": chosen,
                          "avoiding": avoiding})


async def openai_request(request: web.Request) -> web.StreamResponse:
    return await request.app[DISPATCHER_KEY].forwarder.handle(request)
