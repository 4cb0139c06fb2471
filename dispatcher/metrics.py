"""Prometheus metrics of one dispatcher app (its own CollectorRegistry: no globals).

Counters are bumped on the request path; gauges of the cluster (nodes up/down, in-flight
per device) are read from the node registry at scrape time, so they cost nothing per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dispatcher.registry import Registry
from rolemesh.decision import Action, Decision
from rolemesh.decision import Outcome as DecisionOutcome
from rolemesh.device_metrics import device_memory_families

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNKNOWN_MODEL = "-"  # the model label of requests whose model names nothing served


class RequestOutcome:
    """The `outcome` label of rolemesh_dispatcher_requests_total (or an error code)."""

    OK = "ok"  # the agent answered 2xx (for a stream: and it ended cleanly)
    UPSTREAM_ERROR = "upstream_error"  # the agent answered 4xx/5xx, passed on as it was
    STREAM_BROKEN = "stream_broken"  # the agent broke off a stream after its first byte
    CLIENT_GONE = "client_gone"  # the client went away before the answer was complete


class _ClusterCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        snapshot = self._registry.snapshot()
        nodes = GaugeMetricFamily("rolemesh_dispatcher_nodes", "Registered nodes by state",
                                  labels=["state"])
        for state, count in self._registry.count_by_state().items():
            nodes.add_metric([state.value], count)
        yield nodes
        in_flight = GaugeMetricFamily(
            "rolemesh_dispatcher_in_flight",
            "Requests this dispatcher has sent to a device and not seen finish",
            labels=["node", "device"])
        for (node_id, device_id), count in sorted(snapshot.own_in_flight.items()):
            in_flight.add_metric([node_id, device_id], count)
        yield in_flight
        total = GaugeMetricFamily("rolemesh_dispatcher_in_flight_total",
                                  "Requests this dispatcher is forwarding now")
        total.add_metric([], sum(snapshot.own_in_flight.values()))
        yield total
        queue = GaugeMetricFamily(
            "rolemesh_dispatcher_device_queue",
            "In flight plus pending on a device, as its node last reported",
            labels=["node", "device"])
        for (node_id, device_id), d in sorted(snapshot.devices.items()):
            queue.add_metric([node_id, device_id], d.in_flight + d.pending)
        yield queue
        yield from device_memory_families("rolemesh_dispatcher", (
            (node_id, device_id, record.status)
            for (node_id, device_id), record in sorted(snapshot.devices.items())))


# Seconds: from a loaded small model's first token to a cold load of a big one.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "rolemesh_dispatcher_requests", "OpenAI requests by model name and outcome",
            ["model", "outcome"], registry=self.registry)
        self.failovers = Counter(
            "rolemesh_dispatcher_failovers",
            "Requests sent on to another device, by why the previous one failed",
            ["reason"], registry=self.registry)
        self.decisions = Counter(
            "rolemesh_dispatcher_decisions",
            "Routing decisions by action (or outcome, when nothing was chosen)",
            ["action"], registry=self.registry)
        self.cooldowns = Counter(
            "rolemesh_dispatcher_cooldowns",
            "Devices cooled down after failing requests in a row", registry=self.registry)
        self.suspects = Counter(
            "rolemesh_dispatcher_suspects",
            "Nodes made suspect: they accepted a request and sent no first byte in time",
            registry=self.registry)
        self.registrations = Counter(
            "rolemesh_dispatcher_registrations", "Node registrations accepted",
            registry=self.registry)
        self.heartbeats = Counter(
            "rolemesh_dispatcher_heartbeats", "Node heartbeats by whether they were applied",
            ["accepted"], registry=self.registry)
        self.done = Counter(
            "rolemesh_dispatcher_requests_done",
            "Finished OpenAI requests by endpoint, name asked (role), model served, outcome",
            ["endpoint", "role", "model", "outcome"], registry=self.registry)
        self.latency = Histogram(
            "rolemesh_dispatcher_request_duration_seconds",
            "Whole request, from arrival to the last byte of the answer",
            ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram(
            "rolemesh_dispatcher_time_to_first_token_seconds",
            "Streamed requests: from arrival to the first chunk of the answer",
            ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_ClusterCollector(registry))
        # Labelled children, looked up once: labels() validates and locks on every call.
        self._request_children: dict[tuple[str, str], Any] = {}
        self._done_children: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}
        self._decision_children: dict[object, Any] = {
            **{a: self.decisions.labels(a.value) for a in Action},
            **{o: self.decisions.labels(o.value) for o in DecisionOutcome}}

    def request(self, model: str, outcome: str) -> None:
        child = self._request_children.get((model, outcome))
        if child is None:
            child = self._request_children[(model, outcome)] = self.requests.labels(model,
                                                                                    outcome)
        child.inc()

    def request_done(self, *, endpoint: str, role: str, model: str, outcome: str,
                     duration_s: float, ttft_s: float | None) -> None:
        key = (endpoint, role, model, outcome)
        children = self._done_children.get(key)
        if children is None:  # labels() validates and locks: look each set up once
            children = self._done_children[key] = (
                self.done.labels(*key), self.latency.labels(endpoint, model),
                self.ttft.labels(endpoint, model))
        children[0].inc()
        children[1].observe(duration_s)
        if ttft_s is not None:
            children[2].observe(ttft_s)

    def decision(self, decision: Decision) -> None:
        self._decision_children[decision.action or decision.outcome].inc()

    def known_failover_reasons(self, reasons: tuple[str, ...]) -> None:
        """Show each reason at 0 before it first happens (a scrape can then tell 0 from none)."""
        for reason in reasons:
            self.failovers.labels(reason)

    def failover(self, reason: str) -> None:
        self.failovers.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
