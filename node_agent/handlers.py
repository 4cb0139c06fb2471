"""The agent's HTTP handlers: thin; the scheduler, node and proxying modules do the work."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from node_agent.appkeys import HTTP_KEY, NODE_KEY, UPSTREAM_TIMEOUT_KEY
from node_agent.config import ModelConfig
from node_agent.instance import ModelInstance
from node_agent.node import Node
from node_agent.streaming import EarlyStream
from rolemesh import headers
from rolemesh.api import InstanceState, OpenAIModel, OpenAIModelList
from rolemesh.decision_render import render_decision
from rolemesh.errors import BadRequest, ModelNotFound, RoleMeshError, UpstreamFailed
from rolemesh.http import json_response, read_body, read_json_object, request_id_of
from rolemesh.openai_body import parse_request_head
from rolemesh.proxying import buffered_response, open_upstream, read_whole, stream_back

log = structlog.get_logger("node_agent.handlers")

NOTICE_CRASH_S = 2.0  # how long a request waits for a dead child to be noticed, then retries


def state_headers(node: Node, devices: tuple[str, ...]) -> dict[str, str]:
    """The state of the (first) device a request ran on, for the dispatcher's view."""
    device_id = devices[0]
    sched = node.scheduler
    in_flight, pending = sched.queue_of(device_id)
    residents = ",".join(f"{i.model_id}={i.state.value}" for i in sched.instances_on(device_id)
                         if i.state is not InstanceState.EMPTY)
    return {
        headers.NODE: node.config.node_id,
        headers.DEVICE: "+".join(devices),
        headers.RESIDENTS: residents,
        headers.IN_FLIGHT: str(in_flight),
        headers.PENDING: str(pending),
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
        model, devices = node.pick(head.model, wanted_device,
                                   request.headers.get(headers.MODEL) or None)
    except RoleMeshError as err:
        # The dispatcher learns the device's state from refusals too.
        only = wanted_device or (node.device_ids[0] if len(node.device_ids) == 1 else None)
        if only is not None and all(d in node.device_ids for d in only.split("+")):
            err.headers.update(state_headers(node, tuple(only.split("+"))))
        raise
    structlog.contextvars.bind_contextvars(
        device="+".join(devices), model=model.model_id,
        role=head.model if head.model in model.roles else None)
    early = EarlyStream(request, model.model_id) if head.stream else None
    try:
        for attempt in (1, 2):
            try:
                return await _serve(request, node, model, devices, body, head.stream, early)
            except _ChildGone as gone:
                if attempt == 2:
                    raise UpstreamFailed(gone.message) from None
                # Its llama-server died before anyone noticed: once that is noticed the
                # scheduler restarts it, and this request goes again on the new one.
                log.warning("request.child_gone_retrying", error=gone.message)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.instance.wait_ended(), NOTICE_CRASH_S)
        raise AssertionError("unreachable")
    except RoleMeshError as err:
        if early is not None and early.response is not None:
            return await early.fail(err)  # the stream is open: end it with the error
        err.headers.update(state_headers(node, devices))
        raise


class _ChildGone(Exception):
    def __init__(self, instance: ModelInstance, message: str) -> None:
        super().__init__(message)
        self.instance = instance
        self.message = message


async def _serve(request: web.Request, node: Node, model: ModelConfig, devices: tuple[str, ...],
                 body: bytes, stream: bool, early: EarlyStream | None) -> web.StreamResponse:
    forward_headers = {"Content-Type": "application/json",
                       headers.REQUEST_ID: request_id_of(request)}
    lease = node.scheduler.lease(model, devices)
    if early is not None:
        inst = await early.wait(lease.__aenter__(), state_headers(node, devices))
    else:
        inst = await lease.__aenter__()
    try:
        if inst.process is None:  # its llama-server died between the grant and now
            raise _ChildGone(inst, f"llama-server for {model.model_id} exited before the "
                                   "request reached it")
        try:
            upstream = await open_upstream(request.app[HTTP_KEY], inst.base_url + request.path,
                                           body, forward_headers,
                                           request.app[UPSTREAM_TIMEOUT_KEY])
        except UpstreamFailed as exc:
            if _refused(exc):
                raise _ChildGone(inst, exc.message) from None
            raise
        if early is not None and early.response is not None:
            return await early.relay(upstream)
        if stream and upstream.status == 200:
            # A llama-server on loopback that breaks mid-answer has died (or was killed).
            return await stream_back(request, upstream, state_headers(node, devices),
                                     broken_code="upstream_crashed")
        data = await read_whole(upstream)
    finally:
        await lease.__aexit__(None, None, None)  # frees the place on every path
    # Built after the lease is given back, so the headers show the queue without this one.
    return buffered_response(upstream, data, state_headers(node, devices))


def _refused(exc: UpstreamFailed) -> bool:
    cause = exc.__cause__
    return isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError)


# -- admin verbs: load, unload, drain, mode ------------------------------------------------


def _model_named(node: Node, model_id: str) -> ModelConfig:
    model = node.config.model(model_id)
    if model is None:
        raise ModelNotFound(f"model {model_id!r} is not served by node "
                            f"{node.config.node_id!r}; it serves: "
                            f"{', '.join(m.model_id for m in node.config.models)}")
    return model


def _device_of(node: Node, model: ModelConfig, data: dict[str, Any]) -> tuple[str, ...] | None:
    device = data.get("device")
    if device is None:
        return None
    if not isinstance(device, str) or not device:
        raise BadRequest("'device' must be a device id such as 'gpu:0' (or 'gpu:0+gpu:1')")
    return node.placement_of(model, device)


async def load_model(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    model = _model_named(node, request.match_info["model"])
    data = await read_json_object(request)
    inst = await node.scheduler.load(model, _device_of(node, model, data))
    return json_response({"loaded": True, "node_id": node.config.node_id,
                          **node.instance_status(inst, inst.devices[0]).model_dump(mode="json")})


async def unload_model(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    model = _model_named(node, request.match_info["model"])
    data = await read_json_object(request)
    stopped = await node.scheduler.unload(model.model_id, _device_of(node, model, data))
    return json_response({"node_id": node.config.node_id, "model": model.model_id,
                          "unloaded": [k.split("@", 1)[1] for k in stopped]})


async def drain(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    node.scheduler.drain()
    return json_response({"node_id": node.config.node_id, "draining": True})


async def undrain(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    node.scheduler.undrain()
    return json_response({"node_id": node.config.node_id, "draining": False})


async def set_mode(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    data = await read_json_object(request)
    device = data.get("device")
    name = data.get("set")
    if not isinstance(device, str) or device not in node.device_ids:
        raise BadRequest(f"'device' must be one of {', '.join(node.device_ids)}")
    if name is not None and name != "auto" and name not in node.config.sets:
        raise BadRequest(f"no set {name!r} on node {node.config.node_id!r}; sets: "
                         f"{', '.join(node.config.sets) or 'none declared'} (or 'auto')")
    node.scheduler.hold(device, None if name in (None, "auto") else name)
    return json_response({"node_id": node.config.node_id, "device": device,
                          "mode": node.scheduler.held.get(device) or "auto"})


async def optimize(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    before = node.scheduler.starts
    node.scheduler.optimize()
    return json_response({"node_id": node.config.node_id,
                          "started": node.scheduler.starts - before})

