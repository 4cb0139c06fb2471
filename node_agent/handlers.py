"""The agent's HTTP handlers: thin; the slot, node and proxying modules do the work."""

from __future__ import annotations

import structlog
from aiohttp import web

from node_agent.appkeys import HTTP_KEY, NODE_KEY, UPSTREAM_TIMEOUT_KEY
from node_agent.node import Node
from rolemesh import headers
from rolemesh.api import OpenAIModel, OpenAIModelList
from rolemesh.decision_render import render_decision
from rolemesh.errors import RoleMeshError
from rolemesh.http import json_response, read_body, request_id_of
from rolemesh.openai_body import parse_request_head
from rolemesh.proxying import buffered_response, open_upstream, read_whole, stream_back

log = structlog.get_logger("node_agent.handlers")



def state_headers(node: Node, device_id: str) -> dict[str, str]:
    snap = node.slots[device_id].snapshot()
    return {
        headers.NODE: node.config.node_id,
        headers.DEVICE: device_id,
        headers.SLOT_STATE: snap.state.value,
        headers.LOADED_MODEL: snap.loaded_model or "",
        headers.IN_FLIGHT: str(snap.in_flight),
        headers.PENDING: str(snap.pending),
    }


async def health(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return json_response({"status": "ok", "node_id": node.config.node_id})


async def list_models(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    entries = [OpenAIModel(id=m.model_id, roles=list(m.roles)) for m in node.config.models]
    roles: dict[str, list[str]] = {}
    for m in node.config.models:
        for role in m.roles:
            roles.setdefault(role, []).append(m.model_id)
    entries += [OpenAIModel(id=r, kind="role", models=ms) for r, ms in sorted(roles.items())]
    return json_response(OpenAIModelList(data=entries).model_dump(mode="json"))


async def inventory(request: web.Request) -> web.Response:
    return json_response(request.app[NODE_KEY].inventory().model_dump(mode="json"))


async def route(request: web.Request) -> web.Response:
    """What this agent would do with a request for ?model= now (no side effects)."""
    node = request.app[NODE_KEY]
    name = request.query.get("model", "")
    decision = node.decide(name, request.query.get("device") or None)
    return json_response(render_decision(decision))


async def openai_request(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    body = await read_body(request, node.config.max_body_bytes)
    head = parse_request_head(body)
    wanted_device = request.headers.get(headers.DEVICE) or None
    try:
        slot, model = node.pick(head.model, wanted_device,
                                request.headers.get(headers.MODEL) or None)
    except RoleMeshError as err:
        # The dispatcher learns the device's state from refusals too.
        only = wanted_device or (next(iter(node.slots)) if len(node.slots) == 1 else None)
        if only in node.slots:
            err.headers.update(state_headers(node, only))
        raise
    structlog.contextvars.bind_contextvars(device=slot.device_id, model=model.model_id)
    forward_headers = {"Content-Type": "application/json",
                       headers.REQUEST_ID: request_id_of(request)}
    try:
        async with slot.lease(model) as base_url:
            upstream = await open_upstream(request.app[HTTP_KEY], base_url + request.path,
                                           body, forward_headers, request.app[UPSTREAM_TIMEOUT_KEY])
            if head.stream and upstream.status == 200:
                return await stream_back(request, upstream,
                                         state_headers(node, slot.device_id))
            data = await read_whole(upstream)
    except RoleMeshError as err:
        err.headers.update(state_headers(node, slot.device_id))
        raise
    # Built after the lease is given back, so the headers show the queue without this one.
    return buffered_response(upstream, data, state_headers(node, slot.device_id))
