"""The proxy: send a client's OpenAI request to the chosen agent, fail over before the answer.

The hot path reads `model` and `stream` from the body and nothing else, forwards the bytes
untouched (the chosen device and model id travel in `X-RoleMesh-Device` / `-Model`, which is
how an agent serves a dispatcher-only alias), relays an SSE answer chunk by chunk as it
arrives, and keeps the registry's view of the device fresh from the state headers of every
answer.

Failover: when the agent answers 503 `device_busy` / `model_not_ready`, or the connection
fails before any byte of its answer, the decision is taken again without the devices that
failed this request, up to `max_attempts` devices. Once the first byte has gone to the
client there is no retry: a broken stream ends with a terminal SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from dispatcher.access_log import NO_ACCESS_LOG, AccessLog, NoAccessLog
from dispatcher.buffering import Buffer, Holdable, worth_holding
from dispatcher.cooldown import Avoidance, CooldownPolicy
from dispatcher.events import EventHub
from dispatcher.liveness import LivenessWatch
from dispatcher.metrics import UNKNOWN_MODEL, Metrics, RequestOutcome
from dispatcher.registry import Key, NodeRecord, Registry
from dispatcher.request_routing import (
    ROUTE_HEADERS_KEY,
    RequestRouting,
    falls_back,
    with_model,
)
from dispatcher.request_trace import TRACE_KEY, RequestTrace, TimedUpstream, finish
from dispatcher.roles import Resolution
from dispatcher.router import Router
from rolemesh import headers
from rolemesh.api import InstanceState
from rolemesh.decision import Action, Decision
from rolemesh.errors import (
    DeviceBusy,
    GatewayTimeout,
    ModelNotReady,
    NoNodeAvailable,
    QueueTimeout,
    RoleMeshError,
    UpstreamFailed,
)
from rolemesh.http import read_body, request_id_of
from rolemesh.openai_body import OPENAI_PATHS, OpenAIRequestHead, parse_request_head
from rolemesh.proxying import StreamEnd, buffered_response, read_whole, relay_stream

log = structlog.get_logger("dispatcher.forwarding")

__all__ = ["OPENAI_PATHS", "Forwarder"]
FAILOVER_CODES = frozenset({"node_draining", "device_busy", "model_not_ready"})
# Streams an agent ends on purpose (a model switch took the place, it is draining): broken
# for the client, but no sign that the device is failing, so no cool-down.
NOT_DEVICE_FAULTS = frozenset({"model_switch", "draining", "shutdown", "evicted"})
# Why an attempt failed over (the `reason` label of the failover counter).
FAILOVER_REASONS = ("device_busy", "model_not_ready", "connect_failed", "connection_lost",
                    "upstream_failed", "first_byte_timeout")


@dataclass(frozen=True, slots=True)
class Retry:
    """Why an attempt failed in a way that lets the next device try."""

    reason: str  # device_busy, model_not_ready, connect_failed, connection_lost
    note: str
    retry_after_s: float | None = None


def observed_state(h: CIMultiDictProxy[str], key: Key
                   ) -> tuple[tuple[tuple[str, InstanceState], ...], int, int] | None:
    """The state of device `key` as an agent's answer headers report it; None if they do not.

    Headers that name another node or device (a URL that now serves someone else) are ignored.
    """
    residents = h.get(headers.RESIDENTS)
    if residents is None:
        return None
    if h.get(headers.NODE, key[0]) != key[0] or h.get(headers.DEVICE, key[1]) != key[1]:
        return None
    try:
        pairs = tuple((m, InstanceState(s)) for m, _, s in
                      (p.partition("=") for p in residents.split(",") if p))
        return (pairs, int(h.get(headers.IN_FLIGHT, "0")), int(h.get(headers.PENDING, "0")))
    except ValueError:
        return None


def error_code(body: bytes) -> str | None:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Forwarder:
    def __init__(self, registry: Registry, router: Router, metrics: Metrics, *,
                 cluster_token: str | None, max_attempts: int, max_body_bytes: int,
                 connect_timeout_s: float, request_timeout_s: float,
                 busy_retry_after_s: float, first_byte_timeout_s: float | None = None,
                 stream_idle_timeout_s: float | None = None,
                 cooldown: CooldownPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self._http: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], URL] = {}  # parsed once per node and path
        self.max_attempts = max_attempts
        self.max_body_bytes = max_body_bytes
        self.busy_retry_after_s = busy_retry_after_s
        self.events: EventHub | None = None  # set by build_app: request.done events
        self.access_log: AccessLog | NoAccessLog = NO_ACCESS_LOG  # build_app sets a real one
        self.routing: RequestRouting | None = None  # set by build_app: the routing table
        self.buffer = Buffer(0, 1.0)  # build_app sets the configured one (0: off)
        # sock_read bounds the wait for each read (a whole stream may take longer).
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                              sock_read=request_timeout_s)
        # A stream's reads are bounded by first_byte_timeout_s (the headers) and then by
        # stream_idle_timeout_s (each chunk), both applied around the reads.
        self.first_byte_timeout_s = first_byte_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s,
            sock_read=None if first_byte_timeout_s else request_timeout_s)
        self.avoidance = Avoidance(cooldown or CooldownPolicy())
        self._probe_timeout_s = connect_timeout_s
        self._clock = clock
        metrics.known_failover_reasons(FAILOVER_REASONS)
        # The client's Authorization never travels on: agents get the cluster token.
        self._base_headers = {"Content-Type": "application/json"}
        if cluster_token:
            self._base_headers[headers.AUTHORIZATION] = f"Bearer {cluster_token}"

    async def start(self) -> None:
        """Open the one pooled, keep-alive client session that every request goes through."""
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar())  # never carry one agent's cookies to another

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("the forwarder is not started")
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        label = UNKNOWN_MODEL
        trace = request[TRACE_KEY] = RequestTrace(request.path, request_id_of(request))
        try:
            body = await read_body(request, self.max_body_bytes)
            head = parse_request_head(body)
            trace.name = head.model
            structlog.contextvars.bind_contextvars(model=head.model)
            if self.routing is None:
                resolution = self.router.resolve(head.model)
                label = head.model  # only a served name: the metric's labels stay bounded
                return await self._forward(request, body, head, resolution, label)
            plan = await self.routing.plan(head, request.headers)
            label = plan.label
            request[ROUTE_HEADERS_KEY] = plan.headers
            for i, resolution in enumerate(plan.resolutions):
                try:
                    return await self._forward(request, body, head, resolution, label)
                except RoleMeshError as err:
                    if i + 1 >= len(plan.resolutions) or not falls_back(err):
                        err.headers.update(plan.headers)
                        raise
                    plan.fell_back(i, err)
                    log.info("request.fallback", came=resolution.name, why=err.code,
                             goes=plan.resolutions[i + 1].name)
            raise RuntimeError("a routing plan without a target")  # plan() never makes one
        except RoleMeshError as err:
            trace.outcome, trace.status = err.code, err.status
            self.metrics.request(label, err.code)
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            trace.outcome = RequestOutcome.CLIENT_GONE
            self.metrics.request(label, RequestOutcome.CLIENT_GONE)
            raise
        finally:
            # The model stays bound for request.done; the middleware unbinds it after.
            finish(trace, self.metrics, self.events)
            self.access_log.record(trace, request)

    async def _forward(self, request: web.Request, body: bytes, head: OpenAIRequestHead,
                       resolution: Resolution, label: str) -> web.StreamResponse:
        """Forward, or when every candidate is busy hold the request (dispatcher/buffering.py)
        and decide again at each change, until placed, the buffer is full (503) or its time
        is up (504). A client that leaves cancels this task, which lets go of its place."""
        buffer = self.buffer
        ticket = None
        try:
            while True:
                try:
                    return await self._forward_once(
                        request, body, head, resolution, label,
                        buffer.ahead(resolution.name, ticket) if buffer.enabled else 0,
                        None if ticket is None else partial(buffer.placed, ticket))
                except Holdable as busy:
                    if not buffer.enabled:
                        raise busy.error from None
                    if ticket is None:
                        ticket = buffer.admit(resolution.name)
                        if ticket is None:
                            raise busy.error from None  # full: the 503 with Retry-After
                        log.info("request.held", held=len(buffer), why=busy.error.code)
                    else:
                        buffer.readmit(ticket)  # placed, and every device tried was busy
                    if not await buffer.wait(ticket, busy.retry_after_s or 0.0):
                        raise QueueTimeout(
                            f"{resolution.name!r} waited {buffer.timeout_s:g} s at the "
                            f"dispatcher and no device could take it: "
                            f"{busy.error.message}") from None
        finally:
            if ticket is not None:
                buffer.release(ticket)

    async def _forward_once(self, request: web.Request, body: bytes, head: OpenAIRequestHead,
                            resolution: Resolution, label: str, held_ahead: int = 0,
                            placed: Callable[[], None] | None = None
                            ) -> web.StreamResponse:
        stream = head.stream
        base = {**self._base_headers, headers.REQUEST_ID: request_id_of(request)}
        excluded: list[Key] = []
        retries: list[Retry] = []
        for _ in range(self.max_attempts):
            decision = self._decide(resolution, excluded, held_ahead)
            self.metrics.decision(decision)
            winner = decision.winner
            if winner is None:
                if not retries:
                    error = self.router.error_for(decision, resolution.name)
                    if worth_holding(decision):
                        raise Holdable(error)
                    raise error
                break
            if placed is not None:
                placed()  # before the first await: the next held one sees this one begun
            key = (winner.node_id, winner.device_id)
            node = self.registry.node(winner.node_id)
            if node is None:  # unreachable: the decision only names known nodes
                excluded.append(key)
                continue
            if decision.action is not Action.USE_LOADED:
                self.registry.expect(key, winner.model_id)
            log.debug("request.routed", node=winner.node_id, device=winner.device_id,
                      model=winner.model_id, action=decision.action)
            request[TRACE_KEY].chose(winner.node_id, winner.device_id, winner.model_id)
            out = {**base, headers.DEVICE: winner.device_id, headers.MODEL: winner.model_id}
            # The body names the model that answers, so its answer's `model` field does too.
            payload = body if winner.model_id == head.model else \
                with_model(head.data, winner.model_id)
            result = await self._attempt(request, node, key, payload, out, stream, label,
                                         winner.model_id)
            if not isinstance(result, Retry):
                return result
            retries.append(result)
            excluded.append(key)
            self.metrics.failover(result.reason)
            log.info("request.failover", node=winner.node_id, device=winner.device_id,
                     reason=result.reason, note=result.note)
        error = self._exhausted(resolution.name, retries)
        if isinstance(error, DeviceBusy | ModelNotReady):  # agents said busy: worth a wait
            raise Holdable(error, max((r.retry_after_s or self.busy_retry_after_s)
                                      for r in retries if r.reason in FAILOVER_CODES))
        raise error

    def _decide(self, resolution: Resolution, excluded: list[Key],
                held_ahead: int = 0) -> Decision:
        """The decision without cooled or suspect devices, or with them if none is left."""
        avoided = self.avoidance.avoided(self._clock(), self._node_info)
        if avoided:
            decision = self.router.decide(resolution, [*excluded, *avoided], held_ahead)
            if decision.winner is not None:
                return decision
        return self.router.decide(resolution, excluded, held_ahead)

    def _node_info(self, node_id: str) -> tuple[float, tuple[str, ...]] | None:
        node = self.registry.node(node_id)
        return None if node is None else (node.last_seen, node.device_ids)

    def avoiding(self) -> dict[str, object]:
        """What the forwarder avoids now, for /v1/nodes and /v1/route: cool-downs (seconds
        left per "node/device") and suspect nodes."""
        now = self._clock()
        cooling = self.avoidance.cooldowns(now)
        return {"cooldowns": {f"{n}/{d}": left for (n, d), left in sorted(cooling.items())},
                "suspects": self.avoidance.suspects(
                    lambda n: (node.last_seen if (node := self.registry.node(n)) else None))}

    def _failed(self, key: Key) -> None:
        if self.avoidance.failure(key, self._clock()) is not None:
            self.metrics.cooldowns.inc()

    async def _attempt(self, request: web.Request, node: NodeRecord, key: Key, payload: bytes,
                       out: dict[str, str], stream: bool, label: str, model_id: str
                       ) -> web.StreamResponse | Retry:
        registry = self.registry
        http = self._http
        if http is None:
            raise RuntimeError("the forwarder is not started")
        where = f"{key[0]}/{key[1]}"
        registry.begin(key, model_id)
        counted = True
        try:
            url = self._urls.get((node.url, request.path))
            if url is None:
                url = self._urls[(node.url, request.path)] = URL(node.url + request.path)
            upstream = await self._open(http, url, payload, out, key, stream, node.url)
            if isinstance(upstream, Retry):
                return upstream
            state = observed_state(upstream.headers, key)
            extra = {headers.ROUTED_TO: where, headers.REQUEST_ID: out[headers.REQUEST_ID],
                     **request.get(ROUTE_HEADERS_KEY, {})}
            if stream and upstream.status == 200:
                if state is not None:  # sent at the stream's start: they count this request
                    registry.observe(key, *state)
                return await self._stream(request, upstream, extra, label)
            # A buffered answer is complete at the agent before its status line is sent, so
            # its headers no longer count this request: neither should the dispatcher.
            registry.end(key, model_id)
            counted = False
            if state is not None:
                registry.observe(key, *state)
            data = await read_whole(upstream)
            self.access_log.saw_body(request, data)
            retry = self._retry_for(upstream, data, key)
            if retry is not None:
                return retry
            trace = request[TRACE_KEY]
            trace.status = upstream.status
            trace.outcome = (RequestOutcome.OK if upstream.status < 400
                             else RequestOutcome.UPSTREAM_ERROR)
            self.metrics.request(label, trace.outcome)
            return buffered_response(upstream, data, extra)
        finally:
            if counted:
                registry.end(key, model_id)

    async def _open(self, http: aiohttp.ClientSession, url: URL, payload: bytes,
                    out: dict[str, str], key: Key, stream: bool, node_url: str = ""
                    ) -> aiohttp.ClientResponse | Retry:
        """Send the request and wait for the agent's response headers (the first byte).

        A stream's headers must come within first_byte_timeout_s. A non-streamed answer's
        come with the whole answer: after first_byte_timeout_s the agent's /health is asked
        instead (LivenessWatch), and only an agent that does not answer it is given up on.
        """
        where = f"{key[0]}/{key[1]}"
        bound = self.first_byte_timeout_s
        waited = asyncio.timeout(bound if stream else None)
        watch: LivenessWatch | None = None
        try:
            async with waited:
                if bound and not stream and node_url:
                    watch = LivenessWatch(http, node_url + "/health", bound,
                                          self._probe_timeout_s, waited)
                return await http.post(url, data=payload, headers=out,
                                       timeout=self._stream_timeout if stream else self._timeout)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            self._failed(key)
            self._mark_down(key[0], f"connect failed: {exc}")
            return Retry("connect_failed", f"{where}: cannot connect: {exc}")
        except TimeoutError as exc:
            if not waited.expired():
                raise GatewayTimeout(f"{where} did not answer in time") from exc
            # Accepted and then silent: a frozen host, a black hole. Avoid the node until
            # it heartbeats again (a frozen one will not).
            self._failed(key)
            self.avoidance.suspect(key[0], self._clock())
            self.metrics.suspects.inc()
            why = (f"no answer within {bound:g} s" if stream else
                   f"no answer, and /health unanswered, after {bound:g} s")
            return Retry("first_byte_timeout", f"{where}: {why}")
        except (aiohttp.ClientError, OSError) as exc:
            self._failed(key)
            return Retry("connection_lost",
                         f"{where}: connection lost before the answer: {exc!r}")
        finally:
            if watch is not None:
                watch.close()

    def _retry_for(self, upstream: aiohttp.ClientResponse, data: bytes, key: Key
                   ) -> Retry | None:
        """Whether a buffered answer lets the next device try; counts it for cool-downs."""
        where = f"{key[0]}/{key[1]}"
        if upstream.status == 503:
            code = error_code(data)
            if code in FAILOVER_CODES:
                return Retry(code, f"{where}: {code}",
                             retry_after(upstream.headers.get(headers.RETRY_AFTER)))
        elif upstream.status == 502:  # the agent lost its llama-server before answering
            self._failed(key)
            return Retry("upstream_failed", f"{where}: {error_code(data) or 'bad gateway'}")
        if upstream.status < 500:
            self.avoidance.success(key)
        return None

    async def _stream(self, request: web.Request, upstream: aiohttp.ClientResponse,
                      extra: dict[str, str], label: str) -> web.StreamResponse:
        trace = request[TRACE_KEY]
        trace.status = upstream.status
        timed: Any = TimedUpstream(upstream, trace)  # notes when the first chunk arrives
        timed = self.access_log.tap(request, timed)  # keeps its usage for the access log
        relayed = await relay_stream(request, timed, extra,
                                     idle_timeout_s=self.stream_idle_timeout_s)
        key = (str(trace.node_id), str(trace.device_id))
        if relayed.end is StreamEnd.CLEAN:
            outcome = RequestOutcome.OK
            self.avoidance.success(key)
        elif relayed.end is StreamEnd.CLIENT_GONE:
            outcome = RequestOutcome.CLIENT_GONE
        else:  # broken, stalled, or ended by the agent with an error event
            log.warning("request.stream_broken", end=relayed.end.value, error=relayed.error,
                        code=relayed.code)
            outcome = RequestOutcome.STREAM_BROKEN
            if relayed.code not in NOT_DEVICE_FAULTS:
                self._failed(key)
        trace.outcome = outcome
        self.metrics.request(label, outcome)
        return relayed.response

    def _mark_down(self, node_id: str, why: str) -> None:
        if self.registry.mark_down(node_id, why=why) and self.events is not None:
            self.events.node_gone(node_id, "down", why)

    async def call(self, path: str, payload: dict[str, Any], name: str) -> bytes:
        """One buffered request from the dispatcher itself (the classifier role): the same
        decision and failover as a client's, its answer's bytes back; errors raise."""
        http = self._http
        if http is None:
            raise RuntimeError("the forwarder is not started")
        resolution = self.router.resolve(name)
        excluded: list[Key] = []
        retries: list[Retry] = []
        for _ in range(self.max_attempts):
            decision = self.router.decide(resolution, excluded)
            winner = decision.winner
            node = self.registry.node(winner.node_id) if winner is not None else None
            if winner is None or node is None:
                if not retries:
                    raise self.router.error_for(decision, name)
                break
            key = (winner.node_id, winner.device_id)
            out = {**self._base_headers, headers.DEVICE: winner.device_id,
                   headers.MODEL: winner.model_id}
            self.registry.begin(key, winner.model_id)
            try:
                async with http.post(URL(node.url + path), headers=out, timeout=self._timeout,
                                     data=with_model(payload, winner.model_id)) as upstream:
                    data = await upstream.read()
                    state = observed_state(upstream.headers, key)
                    status = upstream.status
            except (aiohttp.ClientError, OSError) as exc:
                retries.append(Retry("connect_failed", f"{key[0]}/{key[1]}: {exc!r}"))
                excluded.append(key)
                continue
            finally:
                self.registry.end(key, winner.model_id)
            if state is not None:
                self.registry.observe(key, *state)
            if status == 503 and error_code(data) in FAILOVER_CODES:
                retries.append(Retry(str(error_code(data)), f"{key[0]}/{key[1]}: busy"))
                excluded.append(key)
                continue
            if status >= 400:
                raise UpstreamFailed(f"{name!r} answered HTTP {status}: {data[:200]!r}")
            return data
        raise self._exhausted(name, retries)

    def _exhausted(self, name: str, retries: list[Retry]) -> RoleMeshError:
        notes = "; ".join(r.note for r in retries)
        busy = [r for r in retries if r.reason in FAILOVER_CODES]
        if busy:
            wait = max((r.retry_after_s or self.busy_retry_after_s) for r in busy)
            if all(r.reason == "model_not_ready" for r in busy):
                return ModelNotReady(f"{name!r}: no device had it ready in time ({notes})",
                                     retry_after_s=wait)
            return DeviceBusy(f"{name!r}: every device tried is busy ({notes})",
                              retry_after_s=wait)
        return NoNodeAvailable(f"{name!r}: no device could take the request ({notes})",
                               retry_after_s=self.busy_retry_after_s)
