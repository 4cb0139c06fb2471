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
from collections.abc import Hashable, Iterable
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
