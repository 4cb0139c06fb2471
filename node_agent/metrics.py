"""Prometheus metrics of one node agent (`GET /metrics`; its own CollectorRegistry).

The API the agent's core calls, one method per thing that happens:

    metrics.request(endpoint, model, role, outcome)          a request ended
    metrics.latency(endpoint, model, seconds)                 ... and how long it took
    metrics.time_to_first_token(endpoint, model, seconds)     a stream's first chunk
    metrics.timings(model, body)                               llama-server's own `timings`
    metrics.model_load(model, device, seconds, ok=True)       a load finished (or failed)
    metrics.stopped(model, device, reason)                    eviction, ttl, unload, crash…
    metrics.restart(model, device) / metrics.crash(model, device)

Gauges of the devices (in flight and queued, memory total / used / charged, utilisation)
are read at scrape time from `devices()`, a callback returning the node id and its device
reports (today's `DeviceStatus` or schema v2's, with `instances`): they cost nothing between
scrapes and cannot drift from the inventory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rolemesh.device_metrics import device_memory_families, figure

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 40, 60, 100, 150, 250, 500, 1000)

DevicesSource = Callable[[], tuple[str, Iterable[Any]]]


def queue_of(device: Any) -> tuple[int, int]:
    """(in flight, queued) of a device report: v2 sums its instances, v1 has the figures."""
    instances = figure(device, "instances")
    if instances is not None:
        return (sum(int(figure(i, "in_flight") or 0) for i in instances),
                sum(int(figure(i, "queued") or 0) for i in instances))
    return int(figure(device, "in_flight") or 0), int(figure(device, "pending") or 0)


class _DeviceCollector(Collector):
    def __init__(self, source: Callable[[], DevicesSource | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        source = self._source()
        if source is None:
            return
        node_id, devices = source()
        devices = list(devices)
        in_flight = GaugeMetricFamily("rolemesh_agent_in_flight",
                                      "Requests being served on a device", labels=["device"])
        queued = GaugeMetricFamily("rolemesh_agent_queue_depth",
                                   "Requests waiting for a device", labels=["device"])
        for d in devices:
            busy, waiting = queue_of(d)
            in_flight.add_metric([str(figure(d, "device_id"))], busy)
            queued.add_metric([str(figure(d, "device_id"))], waiting)
        yield in_flight
        yield queued
        yield from device_memory_families(
            "rolemesh_agent", ((node_id, str(figure(d, "device_id")), d) for d in devices))


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rolemesh_agent_requests",
                                "OpenAI requests by endpoint, model, name asked and outcome",
                                ["endpoint", "model", "role", "outcome"], registry=r)
        self.duration = Histogram("rolemesh_agent_request_duration_seconds",
                                  "Whole request, from arrival to the last byte",
                                  ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("rolemesh_agent_time_to_first_token_seconds",
                              "Streamed requests: arrival to the first chunk (waits included)",
                              ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt = Histogram("rolemesh_agent_llama_prompt_seconds",
                                "llama-server's own prompt time (timings.prompt_ms)",
                                ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tps = Histogram("rolemesh_agent_tokens_per_second",
                             "Generation speed, from llama-server's timings",
                             ["model"], buckets=TPS_BUCKETS, registry=r)
        self.loads = Counter("rolemesh_agent_model_loads", "Model loads by outcome",
                             ["model", "device", "outcome"], registry=r)
        self.load_seconds = Histogram("rolemesh_agent_model_load_seconds",
                                      "From spawn to ready", ["model", "device"],
                                      buckets=LOAD_BUCKETS, registry=r)
        self.stops = Counter("rolemesh_agent_model_stops",
                             "Instances stopped, by reason (evicted_for, ttl, unload, drain, "
                             "mode, moved, crash, shutdown)", ["model", "device", "reason"],
                             registry=r)
        self.restarts = Counter("rolemesh_agent_restarts", "llama-server restarts after failure",
                                ["model", "device"], registry=r)
        self.crashes = Counter("rolemesh_agent_crashes", "llama-server exits nobody asked for",
                               ["model", "device"], registry=r)
        self.estimate_error = Gauge(
            "rolemesh_agent_memory_estimate_error_ratio",
            "(estimate - measured) / measured of a model's memory, at its last load",
            ["model", "device"], registry=r)
        self._devices: DevicesSource | None = None
        r.register(_DeviceCollector(lambda: self._devices))

    def read_devices_from(self, source: DevicesSource) -> None:
        self._devices = source

    # -- what happens -----------------------------------------------------------------------

    def request(self, endpoint: str, model: str, role: str, outcome: str) -> None:
        self.requests.labels(endpoint, model, role, outcome).inc()

    def latency(self, endpoint: str, model: str, seconds: float) -> None:
        self.duration.labels(endpoint, model).observe(seconds)

    def time_to_first_token(self, endpoint: str, model: str, seconds: float) -> None:
        self.ttft.labels(endpoint, model).observe(seconds)

    def timings(self, model: str, body: bytes | Mapping[str, Any]) -> bool:
        """Record llama-server's `timings` from an answer (or a stream's last chunk).

        Returns whether any were there: not every build and endpoint sends them.
        """
        found = parse_timings(body)
        if found is None:
            return False
        prompt_ms, tps = found
        if prompt_ms is not None:
            self.prompt.labels(model).observe(prompt_ms / 1000)
        if tps is not None:
            self.tps.labels(model).observe(tps)
        return True

    def model_load(self, model: str, device: str, seconds: float | None, *,
                   ok: bool = True) -> None:
        self.loads.labels(model, device, "ok" if ok else "failed").inc()
        if ok and seconds is not None:
            self.load_seconds.labels(model, device).observe(seconds)

    def stopped(self, model: str, device: str, reason: str) -> None:
        self.stops.labels(model, device, reason).inc()

    def restart(self, model: str, device: str) -> None:
        self.restarts.labels(model, device).inc()

    def crash(self, model: str, device: str) -> None:
        self.crashes.labels(model, device).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_timings(body: bytes | Mapping[str, Any]) -> tuple[float | None, float | None] | None:
    """(prompt_ms, predicted tokens per second) from an answer's `timings`, if any.

    A streamed answer is a run of `data: {...}` lines: the last one with timings counts.
    """
    docs: list[Any] = []
    if isinstance(body, Mapping):
        docs = [body]
    else:
        text = body.decode(errors="replace")
        if text.lstrip().startswith("{"):
            docs = [_loads(text)]
        else:
            docs = [_loads(line[5:]) for line in text.splitlines()
                    if line.startswith("data:") and "timings" in line]
    for doc in reversed(docs):
        t = doc.get("timings") if isinstance(doc, Mapping) else None
        if isinstance(t, Mapping):
            prompt, tps = t.get("prompt_ms"), t.get("predicted_per_second")
            return (float(prompt) if isinstance(prompt, int | float) else None,
                    float(tps) if isinstance(tps, int | float) else None)
    return None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def scheduler_listener(metrics: AgentMetrics) -> Any:
    """Turn the node scheduler's events into metrics (node_agent.scheduler.NodeScheduler)."""

    def listen(kind: str, data: Mapping[str, Any]) -> None:
        model = str(data.get("model", ""))
        device = "+".join(data.get("devices", []) or [])
        if kind == "instance.ready":
            metrics.model_load(model, device, data.get("load_s"))
            if data.get("restart"):
                metrics.restart(model, device)
        elif kind == "instance.failed":
            if data.get("crashed"):
                metrics.crash(model, device)
            else:
                metrics.model_load(model, device, None, ok=False)
        elif kind == "instance.stopped":
            metrics.stopped(model, device, str(data.get("reason", "")))
        elif kind == "instance.measured" and data.get("error_ratio") is not None:
            metrics.estimate_error.labels(model, device).set(float(data["error_ratio"]))
    return listen
