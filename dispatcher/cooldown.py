"""Which devices the dispatcher avoids for a while: cooled down, or on a suspect node.

- **Cool-down** (per device): `after_failures` consecutive failed requests (the agent
  unreachable, a 502 before the first byte, a stream broken after it, no first byte in
  time) cool the device for `first_s`; once it has been cooled, each further failure cools
  it again for twice as long, up to `max_s`; one success forgets it all.
- **Suspect** (per node): a node that accepted a request and sent no first byte in time
  (a frozen host, a black hole) is avoided until it heartbeats again; a frozen host does
  not, so the next requests avoid it before its heartbeat expires and it is marked down.

The decisions are pure functions of data and a clock value passed in (`after_failure`,
`cooling_left_s`); `Avoidance` only holds the records. Avoiding is never final: the
forwarder decides without the avoided devices first and, if that leaves no winner, again
with them, so a cooled device that is the last candidate for a model still serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("dispatcher.cooldown")

Key = tuple[str, str]  # (node_id, device_id)


@dataclass(frozen=True, slots=True)
class CooldownPolicy:
    after_failures: int = 3
    first_s: float = 5.0
    max_s: float = 60.0


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    failures: int = 0  # consecutive failed requests
    cooldowns: int = 0  # cool-downs since the last success (each doubles the next)
    until: float = 0.0  # cooled until this clock value


def after_failure(health: DeviceHealth, now: float, policy: CooldownPolicy) -> DeviceHealth:
    """The record after one more failed request at `now`."""
    failures = health.failures + 1
    if now < health.until:  # requests sent before it cooled, failing now: no new doubling
        return DeviceHealth(failures, health.cooldowns, health.until)
    if health.cooldowns == 0 and failures < policy.after_failures:
        return DeviceHealth(failures, 0, health.until)
    length = min(policy.max_s, policy.first_s * 2 ** health.cooldowns)
    return DeviceHealth(failures, health.cooldowns + 1, now + length)


def cooling_left_s(health: DeviceHealth, now: float) -> float:
    return max(0.0, health.until - now)


class Avoidance:
    """The dispatcher's records of failing devices and suspect nodes (no I/O, no clock)."""

    def __init__(self, policy: CooldownPolicy) -> None:
        self.policy = policy
        self._health: dict[Key, DeviceHealth] = {}
        self._suspects: dict[str, float] = {}  # node id -> when it was suspected

    def failure(self, key: Key, now: float) -> float | None:
        """Count a failure; the cool-down length if this one started a cool-down."""
        old = self._health.get(key, DeviceHealth())
        new = self._health[key] = after_failure(old, now, self.policy)
        if new.until != old.until:
            length = new.until - now
            log.warning("device.cooled_down", node=key[0], device=key[1],
                        failures=new.failures, cooldown_s=round(length, 3))
            return length
        return None

    def success(self, key: Key) -> None:
        if key in self._health:
            del self._health[key]

    def suspect(self, node_id: str, now: float) -> None:
        if node_id not in self._suspects:
            log.warning("node.suspect", node=node_id, why="no first byte in time")
        self._suspects[node_id] = now

    def is_suspect(self, node_id: str, last_seen: float) -> bool:
        """Suspect until a heartbeat (or registration) newer than the suspicion arrives."""
        since = self._suspects.get(node_id)
        if since is None:
            return False
        if last_seen > since:
            del self._suspects[node_id]
            return False
        return True

    def cooldowns(self, now: float) -> dict[Key, float]:
        """Devices cooling now and the seconds left: for /v1/nodes and /v1/route."""
        return {key: round(cooling_left_s(h, now), 3) for key, h in self._health.items()
                if h.until > now}

    def suspects(self, last_seen: Callable[[str], float | None]) -> list[str]:
        """Nodes suspect now; `last_seen(node_id)` is None for a node no longer known."""
        out = []
        for node_id in list(self._suspects):
            seen = last_seen(node_id)
            if seen is None:
                del self._suspects[node_id]
            elif self.is_suspect(node_id, seen):
                out.append(node_id)
        return sorted(out)

    def avoided(self, now: float,
                node: Callable[[str], tuple[float, Iterable[str]] | None]) -> list[Key]:
        """Devices to leave out of a decision: cooling, or on a suspect node.

        `node(node_id)`: (last_seen, device ids), or None for a node no longer known.
        """
        if not self._health and not self._suspects:
            return []  # the common case, on every request: nothing to look at
        keys = [key for key, h in self._health.items() if h.until > now]
        for node_id in list(self._suspects):
            info = node(node_id)
            if info is None:
                del self._suspects[node_id]
            elif self.is_suspect(node_id, info[0]):
                keys.extend((node_id, d) for d in info[1])
        return keys
