"""Requests to replay: seeded synthetic traces, or the dispatcher's own access log.

A trace is open arrivals (a request at time t, whatever happened before) plus closed-loop
sessions (an agent sends its next request when the previous one is answered, after a
think time). Each call carries a quantile `u` for its completion length, so every policy
sees the same answer lengths for the same request, whichever model serves it.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from rolemesh.simulate.cluster import ClusterFile, SimModel


@dataclass(frozen=True, slots=True)
class Call:
    name: str  # the request's `model`: a role or a model id
    u: float  # completion-length quantile
    prompt_tokens: int | None = None  # None: the serving model's default
    completion_tokens: int | None = None  # None: drawn from the model's distribution at u


@dataclass(frozen=True, slots=True)
class Arrival:
    t: float
    call: Call


@dataclass(frozen=True, slots=True)
class Session:
    start_t: float
    calls: tuple[Call, ...]
    think_s: tuple[float, ...]  # after each call's answer


@dataclass(frozen=True)
class Trace:
    name: str
    arrivals: tuple[Arrival, ...]
    sessions: tuple[Session, ...] = ()
    one_device: bool = False  # run it on the cluster's first device alone
    skipped_lines: int = 0  # access log lines that were not requests

    @property
    def calls(self) -> int:
        return len(self.arrivals) + sum(len(s.calls) for s in self.sessions)

    def names(self) -> list[str]:
        return [a.call.name for a in self.arrivals] + [c.name for s in self.sessions
                                                       for c in s.calls]


# -- synthetic ---------------------------------------------------------------------------------

def mean_service_s(model: SimModel) -> float:
    return model.prompt_tokens / model.prefill_tokens_per_s + \
        model.output_tokens.mean / model.tokens_per_s


def _names(cluster: ClusterFile) -> list[str]:
    roles = [n for n in cluster.names() if n not in cluster.model_by_id]
    return roles or [m.model_id for m in cluster.models]


def _service_of(cluster: ClusterFile, name: str) -> float:
    models = [cluster.model_by_id[m] for m in cluster.resolve(name)]
    return sum(mean_service_s(m) for m in models) / len(models)


def _capacity_per_s(cluster: ClusterFile, weights: dict[str, float]) -> float:
    """Requests per second the cluster serves with every model resident: sum of speeds
    over the work-weighted mean service time."""
    speed = sum(d.speed for n in cluster.nodes for d in n.devices)
    total = sum(weights.values())
    mean = sum(w * _service_of(cluster, n) for n, w in weights.items()) / total
    return speed / mean


def zipf_weights(names: list[str], s: float = 1.2) -> dict[str, float]:
    return {n: 1.0 / (rank + 1) ** s for rank, n in enumerate(names)}


def _poisson(rng: random.Random, weights: dict[str, float], rate: float, start: float,
             end: float) -> list[Arrival]:
    names = list(weights)
    cum = list(weights.values())
    out: list[Arrival] = []
    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return out
        name = rng.choices(names, weights=cum)[0]
        out.append(Arrival(t, Call(name, rng.random())))


def _duration(cluster: ClusterFile, weights: dict[str, float], utilisation: float,
              requests: int) -> float:
    return requests / (utilisation * _capacity_per_s(cluster, weights))


def steady(cluster: ClusterFile, rng: random.Random, requests: int,
           utilisation: float = 0.5) -> Trace:
    names = _names(cluster)
    rng.shuffle(names)
    weights = zipf_weights(names)
    rate = utilisation * _capacity_per_s(cluster, weights)
    return Trace("steady", tuple(_poisson(rng, weights, rate, 0.0, requests / rate)))


def bursts(cluster: ClusterFile, rng: random.Random, requests: int) -> Trace:
    """A calm mix with bursts of 8-16 requests for one role within two seconds."""
    names = _names(cluster)
    weights = dict.fromkeys(names, 1.0)
    duration = _duration(cluster, weights, 0.4, requests)
    background = _poisson(rng, weights, 0.5 * requests / duration, 0.0, duration)
    out = list(background)
    for _ in range(max(1, (requests - len(background)) // 12)):
        t = rng.uniform(0, duration)
        name = rng.choice(names)
        out += [Arrival(t + rng.uniform(0, 2.0), Call(name, rng.random()))
                for _ in range(rng.randint(8, 16))]
    out.sort(key=lambda a: a.t)
    return Trace("bursts", tuple(out))


def agents(cluster: ClusterFile, rng: random.Random, requests: int) -> Trace:
    """Agents in closed loops, each alternating planner -> coder (or the first two roles)."""
    names = _names(cluster)
    pair = ["planner", "coder"] if {"planner", "coder"} <= set(names) else names[:2]
    if len(pair) < 2:
        pair = pair * 2
    devices = sum(len(n.devices) for n in cluster.nodes)
    count = max(2, 2 * devices)
    per = max(2, requests // count)
    sessions = []
    for _ in range(count):
        calls = tuple(Call(pair[i % 2], rng.random()) for i in range(per))
        think = tuple(rng.expovariate(1.0) for _ in range(per))
        sessions.append(Session(rng.uniform(0, 5.0), calls, think))
    return Trace("agents", (), tuple(sessions))


def overload(cluster: ClusterFile, rng: random.Random, requests: int) -> Trace:
    """A calm mix, and in its middle third the top role at 1.8x one device's throughput."""
    names = _names(cluster)
    rng.shuffle(names)
    weights = zipf_weights(names)
    top = names[0]
    one_device = 1.0 / _service_of(cluster, top)
    hot_rate = 1.8 * one_device
    calm = 0.25 * _capacity_per_s(cluster, weights)
    # requests = calm x d + hot x d / 3
    duration = requests / (calm + hot_rate / 3)
    out = _poisson(rng, weights, calm, 0.0, duration)
    out += _poisson(rng, {top: 1.0}, hot_rate, duration / 3, 2 * duration / 3)
    out.sort(key=lambda a: a.t)
    return Trace("overload", tuple(out))


def drift(cluster: ClusterFile, rng: random.Random, requests: int) -> Trace:
    """A Zipf mix whose ranking turns by one role every quarter of the trace."""
    names = _names(cluster)
    rng.shuffle(names)
    weights = zipf_weights(names)
    rate = 0.5 * _capacity_per_s(cluster, weights)
    duration = requests / rate
    out: list[Arrival] = []
    for phase in range(4):
        turned = names[phase % len(names):] + names[:phase % len(names)]
        out += _poisson(rng, zipf_weights(turned), rate, phase * duration / 4,
                        (phase + 1) * duration / 4)
    return Trace("drift", tuple(out))


def one_gpu(cluster: ClusterFile, rng: random.Random, requests: int) -> Trace:
    """A Zipf mix at a third of one device's throughput, on the first device alone."""
    box = cluster.one_device()
    trace = steady(box, rng, requests, utilisation=0.3)
    return Trace("one-gpu", trace.arrivals, one_device=True)


SYNTHETIC: dict[str, Callable[[ClusterFile, random.Random, int], Trace]] = {
    "steady": steady, "bursts": bursts, "agents": agents, "overload": overload,
    "drift": drift, "one-gpu": one_gpu,
}


def synthetic(name: str, cluster: ClusterFile, seed: int, requests: int) -> Trace:
    return SYNTHETIC[name](cluster, random.Random(f"{name}:{seed}"), requests)


# -- the dispatcher's access log ------------------------------------------------------------------

def log_files(path: Path) -> list[Path]:
    """The log and its rotated backups, oldest first (path.N ... path.1, path)."""
    backups = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit():
            backups.append((int(suffix), p))
    ordered = [p for _, p in sorted(backups, reverse=True)]
    return [*ordered, path] if path.exists() else ordered


def read_access_log(paths: Iterable[Path]) -> Trace:
    """Every request line as an arrival at its time after the first one."""
    rows: list[tuple[float, Call]] = []
    skipped = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                t = float(row["ts"])
                name = str(row["model"])
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            if not math.isfinite(t) or not name:
                skipped += 1
                continue
            rows.append((t, Call(name, _u_of(row), _int(row.get("prompt_tokens")),
                                 _int(row.get("completion_tokens")))))
    rows.sort(key=lambda r: r[0])
    first = rows[0][0] if rows else 0.0
    return Trace("access-log", tuple(Arrival(t - first, c) for t, c in rows),
                 skipped_lines=skipped)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def _u_of(row: dict[str, object]) -> float:
    """A stable quantile per line, for answers whose length the log does not know."""
    return random.Random(str(row.get("request_id") or row.get("ts"))).random()
