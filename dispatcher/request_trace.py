"""What one forwarded request did, gathered on the way, reported once at its end.

The forwarder fills a `RequestTrace` (name asked, endpoint, the device and model that
served, time to first byte of a stream, outcome); `finish()` hands it to the metrics
histograms and the event hub, so `/metrics`, the dashboard and `rolemesh watch` see the
same request the same way.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web

if TYPE_CHECKING:
    from dispatcher.events import EventHub
    from dispatcher.metrics import Metrics


@dataclass
class RequestTrace:
    endpoint: str
    request_id: str = ""
    name: str = "-"  # the model, role or alias the client asked for
    node_id: str | None = None
    device_id: str | None = None
    model_id: str | None = None  # the model that served it
    attempts: int = 0
    outcome: str = "client_gone"  # overwritten on every path that gets to an answer
    status: int | None = None
    started: float = field(default_factory=time.perf_counter)
    first_byte_at: float | None = None

    def chose(self, node_id: str, device_id: str, model_id: str) -> None:
        self.node_id, self.device_id, self.model_id = node_id, device_id, model_id
        self.attempts += 1
        # request.done (logged by the shared middleware) then names where it went.
        structlog.contextvars.bind_contextvars(node=node_id, device=device_id,
                                               model_id=model_id)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at - self.started

    def as_event(self) -> dict[str, Any]:
        ttft = self.ttft_s
        return {"request_id": self.request_id, "endpoint": self.endpoint, "name": self.name,
                "node_id": self.node_id, "device_id": self.device_id,
                "model_id": self.model_id, "attempts": self.attempts,
                "outcome": self.outcome, "status": self.status,
                "ttft_s": None if ttft is None else round(ttft, 4),
                "duration_s": round(time.perf_counter() - self.started, 4)}


TRACE_KEY = web.RequestKey("rolemesh_trace", RequestTrace)


class _TimedContent:
    def __init__(self, content: aiohttp.StreamReader, trace: RequestTrace) -> None:
        self._content = content
        self._trace = trace

    async def iter_any(self) -> AsyncIterator[bytes]:
        async for chunk in self._content.iter_any():
            if self._trace.first_byte_at is None:
                self._trace.first_byte_at = time.perf_counter()
            yield chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._content, name)


class TimedUpstream:
    """An upstream response whose stream notes when its first chunk arrived."""

    def __init__(self, upstream: aiohttp.ClientResponse, trace: RequestTrace) -> None:
        self._upstream = upstream
        self.content = _TimedContent(upstream.content, trace)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._upstream, name)


def finish(trace: RequestTrace, metrics: Metrics, events: EventHub | None) -> None:
    data = trace.as_event()
    metrics.request_done(endpoint=trace.endpoint, role=trace.name,
                         model=trace.model_id or "-", outcome=trace.outcome,
                         duration_s=data["duration_s"], ttft_s=trace.ttft_s)
    if events is not None:
        events.request_done(**data)
