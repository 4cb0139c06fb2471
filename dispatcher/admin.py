"""The operator's verbs on the dispatcher: load, unload, drain, undrain, mode, optimize.

Each is carried out by the agents (the one owner of their instances): the dispatcher picks
the node and device when the caller did not (its decision, the same as for a request), asks
the agent, and returns what the agent said. A drain also stops routing to the node at once,
before the agent's next heartbeat says so. Callers need the cluster token or an admin key.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import structlog
from aiohttp import web

from dispatcher.appkeys import DISPATCHER_KEY, Dispatcher
from rolemesh.api import InstanceState
from rolemesh.errors import (
    BadRequest,
    Forbidden,
    ModelNotFound,
    NodeNotFound,
    NoNodeAvailable,
    RoleMeshError,
    Unauthorized,
    UpstreamFailed,
)
from rolemesh.http import json_response, read_json_object, token_matches

log = structlog.get_logger("dispatcher.admin")
ADMIN_TIMEOUT_S = 600.0  # a load waits for the model to be ready


def require_admin(request: web.Request, d: Dispatcher) -> None:
    accepted = [*(d.config.admin_keys or ()), *([d.config.cluster_token]
                                                if d.config.cluster_token else [])]
    if not accepted:  # a client's key is not an operator's: say what to configure
        raise Forbidden("operator actions need admin_keys or a cluster_token in the "
                        "dispatcher's config; neither is set")
    if not token_matches(request, accepted):
        raise Unauthorized("this is an operator action: 'Authorization: Bearer <admin key or "
                           "cluster token>'", headers={"WWW-Authenticate": "Bearer"})


async def _body(request: web.Request) -> dict[str, Any]:
    data = await read_json_object(request)
    if data.get("device") and not data.get("node") and "set" not in data:
        raise BadRequest("'device' names a device of a node: name the node too")
    for field in ("node", "device", "set"):
        if field in data and data[field] is not None and not isinstance(data[field], str):
            raise BadRequest(f"'{field}' must be a string")
    return data


class AgentError(RoleMeshError):
    """An agent's own error answer, passed on with its status and code."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        reported = body.get("error")
        error: dict[str, Any] = reported if isinstance(reported, dict) else {}
        super().__init__(str(error.get("message", "the agent refused")))
        self.status = status  # type: ignore[misc]
        self._code = str(error.get("code", "agent_error"))
        self._type = str(error.get("type", "server_error"))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self._type, "code": self._code}}


async def call_agent(d: Dispatcher, node_id: str, path: str, payload: dict[str, Any]
                     ) -> dict[str, Any]:
    node = d.registry.node(node_id)
    if node is None:
        raise NodeNotFound(f"no node {node_id!r} is registered")
    http = d.forwarder.http
    auth = {"Authorization": f"Bearer {d.config.cluster_token}"} if d.config.cluster_token \
        else {}
    try:
        async with http.post(node.url + path, json=payload, headers=auth,
                             timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = {}
            if resp.status >= 400:
                raise AgentError(resp.status, body if isinstance(body, dict) else {})
            return body if isinstance(body, dict) else {}
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamFailed(f"node {node_id!r} did not answer {path}: {exc}") from exc


def _holders(d: Dispatcher, model_id: str) -> list[tuple[str, str]]:
    """(node, placement) of every instance of `model_id` the registry knows of."""
    snap = d.registry.snapshot()
    out: list[tuple[str, str]] = []
    for (node_id, device_id), record in sorted(snap.devices.items()):
        for inst in record.status.instances:
            if inst.model_id == model_id and inst.state is not InstanceState.EMPTY:
                where = (node_id, "+".join(inst.devices))
                if where not in out:
                    out.append(where)
        if any(m == model_id for m, _ in record.residents) and not any(
                n == node_id and device_id in p.split("+") for n, p in out):
            out.append((node_id, device_id))
    return out


async def load(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER_KEY]
    require_admin(request, d)
    model_id = request.match_info["model"]
    data = await _body(request)
    node_id, device = data.get("node"), data.get("device")
    if node_id is None:
        resolution = d.router.resolve(model_id)
        if resolution.kind.value != "model":
            raise BadRequest(f"{model_id!r} is a {resolution.kind.value}: load names a "
                             "model id")
        decision = d.router.decide(resolution)
        if decision.winner is None:
            raise d.router.error_for(decision, model_id)
        node_id, device = decision.winner.node_id, decision.winner.device_id
    payload = {"device": device} if device else {}
    answer = await call_agent(d, node_id, f"/v1/models/{model_id}/load", payload)
    log.info("admin.load", model=model_id, node=node_id, device=device)
    return json_response({**answer, "node_id": node_id})


async def unload(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER_KEY]
    require_admin(request, d)
    model_id = request.match_info["model"]
    data = await _body(request)
    node_id, device = data.get("node"), data.get("device")
    if node_id is not None:
        targets = [(node_id, device)]
    else:
        targets = [(n, None) for n in dict.fromkeys(n for n, _ in _holders(d, model_id))]
        if not targets:
            if not any(model_id in n.costs for n in d.registry.snapshot().nodes.values()):
                raise ModelNotFound(f"no node serves a model {model_id!r}")
            return json_response({"model": model_id, "unloaded": []})
    unloaded = []
    for n, dev in targets:
        answer = await call_agent(d, n, f"/v1/models/{model_id}/unload",
                                  {"device": dev} if dev else {})
        unloaded += [{"node_id": n, "devices": p} for p in answer.get("unloaded", [])]
    log.info("admin.unload", model=model_id, unloaded=unloaded)
    return json_response({"model": model_id, "unloaded": unloaded})


async def drain(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER_KEY]
    require_admin(request, d)
    node_id = request.match_info["node_id"]
    if d.registry.node(node_id) is None:
        raise NodeNotFound(f"no node {node_id!r} is registered")
    d.registry.set_draining(node_id, True)
    answer = await call_agent(d, node_id, "/v1/node/drain", {})
    return json_response(answer)


async def undrain(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER_KEY]
    require_admin(request, d)
    node_id = request.match_info["node_id"]
    answer = await call_agent(d, node_id, "/v1/node/undrain", {})
    d.registry.set_draining(node_id, False)
    return json_response(answer)


async def mode(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER_KEY]
    require_admin(request, d)
    node_id = request.match_info["node_id"]
    data = await _body(request)
    if not data.get("device"):
        raise BadRequest("name the device: {\"device\": \"gpu:0\", \"set\": \"architect\"} "
                         "(\"set\": \"auto\" releases it)")
    answer = await call_agent(d, node_id, "/v1/node/mode",
                              {"device": data["device"], "set": data.get("set")})
    return json_response(answer)


async def optimize(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER_KEY]
    require_admin(request, d)
    node_ids = [request.match_info["node_id"]] if "node_id" in request.match_info else sorted(
        n.node_id for n in d.registry.snapshot().nodes.values() if n.state.value == "up")
    if not node_ids:
        raise NoNodeAvailable("no node is up")
    results = [await call_agent(d, n, "/v1/node/optimize", {}) for n in node_ids]
    return json_response({"nodes": results})


def setup_admin_routes(app: web.Application) -> None:
    app.router.add_post("/v1/models/{model}/load", load)
    app.router.add_post("/v1/models/{model}/unload", unload)
    app.router.add_post("/v1/nodes/{node_id}/drain", drain)
    app.router.add_post("/v1/nodes/{node_id}/undrain", undrain)
    app.router.add_post("/v1/nodes/{node_id}/mode", mode)
    app.router.add_post("/v1/nodes/{node_id}/optimize", optimize)
    app.router.add_post("/v1/optimize", optimize)
