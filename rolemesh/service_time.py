"""How many seconds of its device one request of a model takes, measured where it runs.

The decision prices a queue as `queue x service_s`. One default for every model makes a
32B model's queue look as short as a 3B one's: a burst for the big model waits at the
dispatcher for a copy that is never made (its wait looks cheap) until it times out. The
node agent measures each model with this meter and reports the figure
(`ModelStatus.service_s`); the simulator runs the same meter on its simulated devices.

A device's time is split evenly among the requests running on it at each moment (what a
device does with parallel slots, and with co-resident models sharing its compute): a
request's figure is its share summed over its run. A request that ran beside three others
for 40 s took 10 s of the device. Its own duration would count the neighbours' work too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

WINDOW = 20  # requests per model the figure is the mean of: recent enough to follow a change


@dataclass(slots=True)
class _Run:
    model_id: str
    took_s: float = 0.0


class ServiceMeter:
    """One device: the requests running on it now, and recent figures per model."""

    def __init__(self, window: int = WINDOW) -> None:
        self._window = window
        self._t = 0.0
        self._running: dict[Hashable, _Run] = {}
        self._samples: dict[str, deque[float]] = {}

    def started(self, request: Hashable, model_id: str, now: float) -> None:
        self._advance(now)
        self._running[request] = _Run(model_id)

    def finished(self, request: Hashable, now: float) -> None:
        """The request ended: answered, failed or abandoned, it held the device either way."""
        self._advance(now)
        run = self._running.pop(request, None)
        if run is not None:
            self._samples.setdefault(run.model_id, deque(maxlen=self._window)).append(run.took_s)

    def _advance(self, now: float) -> None:
        dt = now - self._t
        self._t = now
        if dt > 0 and self._running:
            share = dt / len(self._running)
            for run in self._running.values():
                run.took_s += share

    def samples(self, model_id: str) -> tuple[float, ...]:
        return tuple(self._samples.get(model_id, ()))


def service_s(meters: Iterable[ServiceMeter], model_id: str) -> float | None:
    """The mean over a node's devices' recent figures for a model; None before one ended."""
    samples = [s for m in meters for s in m.samples(model_id)]
    return sum(samples) / len(samples) if samples else None


class ServiceFigures:
    """Each model's measured service time per node, and its mean over the nodes: what a
    node that has not measured a model yet is priced at (`choose(measured=...)`). The
    dispatcher's registry keeps one from the nodes' reports, the simulator one from its
    simulated agents'. Running sums, so a request reads a mean in O(1) however many nodes
    report."""

    def __init__(self) -> None:
        self._by_node: dict[str, dict[str, float]] = {}  # node -> model -> seconds
        self._sum: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def report(self, node_id: str, figures: Mapping[str, float]) -> None:
        self.drop(node_id)
        self._by_node[node_id] = dict(figures)
        for model_id, s in figures.items():
            self._sum[model_id] = self._sum.get(model_id, 0.0) + s
            self._count[model_id] = self._count.get(model_id, 0) + 1

    def drop(self, node_id: str) -> None:
        for model_id, s in self._by_node.pop(node_id, {}).items():
            self._count[model_id] -= 1
            if self._count[model_id]:
                self._sum[model_id] -= s
            else:
                del self._count[model_id], self._sum[model_id]

    def means(self, model_ids: Iterable[str]) -> dict[str, float]:
        return {m: self._sum[m] / self._count[m] for m in model_ids if m in self._count}
