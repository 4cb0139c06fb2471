"""Register with the dispatcher, then heartbeat; re-register when it has forgotten us."""

from __future__ import annotations

import asyncio

import aiohttp
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from node_agent.node import Node
from rolemesh.api import DeregisterRequest, HeartbeatRequest, ModelStatus, RegisterRequest

log = structlog.get_logger("node_agent.registration")


class DispatcherRefused(Exception):
    """The dispatcher answered, but not with success (wrong token, bad request...)."""


class DispatcherForgotUs(Exception):
    pass


async def _post(http: aiohttp.ClientSession, url: str, token: str | None, payload: str,
                timeout_s: float) -> dict[str, object]:
    request_headers = {"Content-Type": "application/json"}
    if token:
        request_headers["Authorization"] = f"Bearer {token}"
    async with http.post(url, data=payload, headers=request_headers,
                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status == 404:
            raise DispatcherForgotUs()
        if resp.status >= 400:
            text = (await resp.text())[:300]
            raise DispatcherRefused(f"{url} answered {resp.status}: {text}")
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}


async def run_registration(node: Node, http: aiohttp.ClientSession) -> None:
    config = node.config
    assert config.dispatcher_base_url is not None
    base = config.dispatcher_base_url.rstrip("/")
    interval = config.heartbeat_interval_s
    timeout_s = max(2.0, interval)
    retry_wait = wait_exponential(multiplier=0.2, max=max(interval, 1.0))
    transient = retry_if_exception_type((aiohttp.ClientError, asyncio.TimeoutError, OSError,
                                         DispatcherRefused))
    while True:
        answer: dict[str, object] = {}
        # Register, retrying with backoff for as long as the dispatcher is away.
        async for attempt in AsyncRetrying(retry=transient, wait=retry_wait):
            with attempt:
                n = attempt.retry_state.attempt_number
                try:
                    payload = RegisterRequest(inventory=node.inventory()).model_dump_json()
                    answer = await _post(http, base + "/v1/nodes/register",
                                         config.cluster_token, payload, timeout_s)
                except Exception as exc:
                    log.warning("registration.failed", dispatcher=base, attempt=n,
                                error=str(exc) or type(exc).__name__)
                    raise
        # The dispatcher judges liveness by its own interval: beat at that pace.
        asked = answer.get("heartbeat_interval_s")
        if isinstance(asked, int | float) and asked > 0:
            interval = float(asked)
        log.info("registration.registered", dispatcher=base, node_id=config.node_id,
                 heartbeat_interval_s=interval)
        try:
            await _heartbeat_until_forgotten(node, http, base, interval, timeout_s)
        except DispatcherForgotUs:
            log.warning("registration.forgotten", dispatcher=base)


async def _heartbeat_until_forgotten(node: Node, http: aiohttp.ClientSession, base: str,
                                     interval: float, timeout_s: float) -> None:
    failing = False
    last_models: list[ModelStatus] | None = None
    while True:
        await asyncio.sleep(interval)
        models = node.model_statuses()
        beat = HeartbeatRequest(node_id=node.config.node_id, seq=node.next_seq(),
                                devices=[node.device_status(d) for d in node.device_ids],
                                # Unchanged models are left out: less for both sides to parse.
                                models=None if models == last_models else models,
                                sets=dict(node.config.sets) if last_models is None else None,
                                draining=node.scheduler.draining,
                                host_memory_total_mb=node.host()[0],
                                host_memory_available_mb=node.host()[1],
                                recent_stops=node.stop_records())
        try:
            await _post(http, base + "/v1/nodes/heartbeat", node.config.cluster_token,
                        beat.model_dump_json(), timeout_s)
        except (TimeoutError, aiohttp.ClientError, OSError, DispatcherRefused) as exc:
            if not failing:
                log.warning("heartbeat.failed", dispatcher=base, error=str(exc) or
                            type(exc).__name__)
            failing = True
            continue
        last_models = models
        if failing:
            log.info("heartbeat.recovered", dispatcher=base)
        failing = False


async def deregister(node: Node, http: aiohttp.ClientSession) -> None:
    """Tell the dispatcher this node is going (on SIGTERM); a failure only costs the node
    timeout there."""
    config = node.config
    assert config.dispatcher_base_url is not None
    url = config.dispatcher_base_url.rstrip("/") + "/v1/nodes/deregister"
    try:
        await _post(http, url, config.cluster_token,
                    DeregisterRequest(node_id=config.node_id).model_dump_json(), 2.0)
    except (DispatcherForgotUs, DispatcherRefused, aiohttp.ClientError, TimeoutError,
            OSError) as exc:
        log.warning("registration.deregister_failed", error=str(exc) or type(exc).__name__)
        return
    log.info("registration.deregistered", dispatcher=config.dispatcher_base_url)
