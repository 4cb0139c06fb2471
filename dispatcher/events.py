"""The event hub: what changed in the cluster, as a snapshot plus a stream (`GET /v1/events`).

Events are derived from what the dispatcher already receives, so the registry's internals do
not change: every node report (registration, heartbeat) is diffed against the previous one
of the same node (`diff_devices`, a pure function of the devices' `instances: [...]` and
the node's `recent_stops`); node expiry reports up/down; the forwarder reports each
request's end.

Each subscriber has a bounded queue. One that falls behind (a slow browser tab) loses its
queue and gets a fresh snapshot instead, so a slow client never holds memory or the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger("dispatcher.events")

SUBSCRIBER_QUEUE = 256  # events a client may be behind before it is re-snapshotted
RECENT_EVENTS = 200  # kept for the snapshot: recent requests, loads and stops
KEEPALIVE_S = 15.0  # an SSE comment this often: proxies keep the stream, dead clients show

# Instance states that hold (or are getting) memory on a device.
_LIVE = frozenset({"starting", "ready", "draining", "stopping"})


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    type: str  # node.up, node.down, node.forgotten, instance.state, model.loaded,
    # model.stopped, request.done (and "snapshot", sent to each client first)
    data: Mapping[str, Any]
    at: float  # wall-clock seconds (for the page to show "12 s ago")

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "at": self.at, **self.data}


# -- reading reports (v1 and v2) ------------------------------------------------------------


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One model instance on a device (or device group), as a report shows it."""

    model_id: str
    devices: tuple[str, ...]
    state: str
    last_load_s: float | None = None
    restarts: int = 0
    last_error: str | None = None


def instances_of(devices: Iterable[Any]) -> dict[tuple[tuple[str, ...], str], InstanceView]:
    """Every instance the devices of one report hold, keyed by (devices, model id): each
    device lists its `instances`; a model split over devices appears under each, once here.
    """
    found: dict[tuple[tuple[str, ...], str], InstanceView] = {}
    for d in devices:
        device_id = str(_get(d, "device_id"))
        for inst in _get(d, "instances") or ():
            group = tuple(_get(inst, "devices") or (device_id,))
            model = str(_get(inst, "model_id"))
            found.setdefault((group, model), InstanceView(
                model, group, str(_value(_get(inst, "state"))),
                _get(inst, "last_load_s"), int(_get(inst, "restarts") or 0),
                _get(inst, "last_error")))
    return found


def _stop_key(stop: Any) -> tuple[str, tuple[str, ...], str, str]:
    return (str(_get(stop, "model_id")), tuple(_get(stop, "devices") or ()),
            str(_value(_get(stop, "reason"))), str(_get(stop, "detail") or ""))


@dataclass
class NodeMemory:
    """What the hub remembers of a node's last report, to diff the next one against."""

    instances: dict[tuple[tuple[str, ...], str], InstanceView] = field(default_factory=dict)
    stops: set[tuple[str, tuple[str, ...], str, str]] = field(default_factory=set)
    up: bool = True


Change = tuple[str, dict[str, Any]]  # (event type, its data)


def diff_devices(node_id: str, old: NodeMemory | None, devices: Iterable[Any],
                 recent_stops: Iterable[Any] | None) -> tuple[NodeMemory, list[Change]]:
    """The events between a node's previous report and this one, and what to remember.

    Pure: reports in, (type, data) pairs out. A stop is named by the node's own record
    (`recent_stops`); one without a record (not named yet) is `unknown`.
    """
    now_instances = instances_of(devices)
    stops = list(recent_stops or ())
    stop_keys = {_stop_key(s) for s in stops}
    before = old.instances if old is not None else {}
    seen_stops = old.stops if old is not None else set()
    out: list[Change] = []
    fresh_stops = [s for s in stops if _stop_key(s) not in seen_stops]
    explained: set[tuple[tuple[str, ...], str]] = set()

    for key, inst in now_instances.items():
        prev = before.get(key)
        base = {"node_id": node_id, "devices": list(inst.devices), "device_id": inst.devices[0],
                "model_id": inst.model_id}
        if prev is None or prev.state != inst.state:
            out.append(("instance.state", {**base, "old": prev.state if prev else "empty",
                                           "new": inst.state}))
            if inst.state == "ready" and (prev is None or prev.state != "ready"):
                out.append(("model.loaded", {**base, "load_s": inst.last_load_s}))
        if prev is not None and inst.restarts > prev.restarts:
            out.append(("model.stopped", {**base, "reason": "crash",
                                          "detail": inst.last_error or "restarted"}))
            explained.add(key)

    for key, prev in before.items():
        if key in now_instances:
            continue
        base = {"node_id": node_id, "devices": list(prev.devices),
                "device_id": prev.devices[0], "model_id": prev.model_id}
        record = next((s for s in fresh_stops if _stop_key(s)[0] == prev.model_id
                       and set(_stop_key(s)[1] or prev.devices) == set(prev.devices)), None)
        if record is not None:
            reason, detail = str(_value(_get(record, "reason"))), _get(record, "detail")
            fresh_stops.remove(record)
        else:
            reason, detail = "unknown", "the node's report named no reason"
        out.append(("instance.state", {**base, "old": prev.state, "new": "empty"}))
        out.append(("model.stopped", {**base, "reason": reason, "detail": detail}))
        explained.add(key)

    # Stops of instances this hub never saw (started and stopped between two reports).
    for s in fresh_stops:
        model, group, reason, detail = _stop_key(s)
        if (group, model) in explained:
            continue
        out.append(("model.stopped", {"node_id": node_id, "devices": list(group),
                                      "device_id": group[0] if group else None,
                                      "model_id": model, "reason": reason,
                                      "detail": detail or None}))
    return NodeMemory(now_instances, stop_keys, True), out


# -- the hub --------------------------------------------------------------------------------


RESYNC = object()  # put in a lagging subscriber's queue: send it a fresh snapshot


class Subscription:
    def __init__(self, limit: int) -> None:
        self.queue: asyncio.Queue[Event | object] = asyncio.Queue(limit)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # Behind by a whole queue: forget what it missed, start it over from a snapshot.
            self.dropped += 1
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(RESYNC)


class EventHub:
    def __init__(self, snapshot: Callable[[], dict[str, Any]], *,
                 wall_clock: Callable[[], float] = time.time,
                 queue_limit: int = SUBSCRIBER_QUEUE, recent: int = RECENT_EVENTS) -> None:
        self._snapshot = snapshot
        self._wall = wall_clock
        self._ids = itertools.count(1)
        self._subs: set[Subscription] = set()
        self._nodes: dict[str, NodeMemory] = {}
        self._queue_limit = queue_limit
        self.recent: deque[Event] = deque(maxlen=recent)

    # -- what happens -----------------------------------------------------------------------

    def publish(self, type_: str, data: Mapping[str, Any]) -> Event:
        event = Event(next(self._ids), type_, dict(data), round(self._wall(), 3))
        self.recent.append(event)
        for sub in self._subs:
            sub.offer(event)
        return event

    def node_report(self, node_id: str, devices: Iterable[Any],
                    recent_stops: Iterable[Any] | None = None) -> list[Event]:
        """A registration or heartbeat that the registry accepted."""
        devices = list(devices)
        old = self._nodes.get(node_id)
        memory, changes = diff_devices(node_id, old, devices, recent_stops)
        events = []
        if old is None or not old.up:
            events.append(self.publish("node.up", {"node_id": node_id}))
        self._nodes[node_id] = memory
        events += [self.publish(t, d) for t, d in changes]
        return events

    def node_gone(self, node_id: str, change: str, why: str | None = None) -> Event | None:
        """`change`: down or forgotten (the registry's expiry), down (a refused connection)."""
        memory = self._nodes.get(node_id)
        if change == "forgotten":
            self._nodes.pop(node_id, None)
        elif memory is not None:
            if not memory.up:
                return None
            memory.up = False
        return self.publish(f"node.{change}", {"node_id": node_id, "why": why})

    def request_done(self, **data: Any) -> Event:
        return self.publish("request.done", data)

    # -- who listens ------------------------------------------------------------------------

    def snapshot_event(self) -> dict[str, Any]:
        return {"type": "snapshot", "at": round(self._wall(), 3), **self._snapshot(),
                "recent": [e.as_json() for e in self.recent],
                "last_id": self.recent[-1].id if self.recent else 0}

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        sub = Subscription(self._queue_limit)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def stream(self, sub: Subscription,
                     keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[dict[str, Any] | None]:
        """Snapshot first, then each event; None when a keep-alive comment is due."""
        snapshot = self.snapshot_event()
        yield snapshot
        while True:
            try:
                item = await asyncio.wait_for(sub.queue.get(), keepalive_s)
            except TimeoutError:
                yield None
                continue
            if item is RESYNC:
                snapshot = self.snapshot_event()
                yield snapshot
            elif isinstance(item, Event) and item.id > snapshot["last_id"]:
                yield item.as_json()  # (older ones are in the snapshot already)


def sse_message(payload: Mapping[str, Any]) -> bytes:
    """One SSE message; `event:` names its type so EventSource listeners can pick."""
    event_id = payload.get("id")
    head = f"event: {payload['type']}\n" + (f"id: {event_id}\n" if event_id else "")
    return (head + "data: " + json.dumps(payload, separators=(",", ":")) + "\n\n").encode()


async def serve_events(request: web.Request, hub: EventHub) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    with hub.subscribe() as sub:
        try:
            async for item in hub.stream(sub):
                await response.write(b": keep-alive\n\n" if item is None else sse_message(item))
        except ConnectionResetError:
            pass  # the client went away: nothing to tell it
    return response


EVENTS_KEY = web.AppKey("events", EventHub)
