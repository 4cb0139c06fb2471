"""Requests held at the dispatcher while every device that could serve them is busy.

Instead of a 503 the moment each candidate is at its pending limit (or when waiting for
a busy copy costs less than loading another: `rolemesh.decision`), the request waits here,
bounded in count (`max_buffered_requests`) and in time (`buffer_timeout_s`), and is
decided again the moment something changes: the registry reports every request that
ends, every state an agent's answer or heartbeat reports (a load finished, a device
freed) to `wake()`. Nothing polls. Past the count the client gets the 503 (Retry-After)
at once; a request that waited its whole time gets a 504 `queue_timeout`. A client that
disconnects cancels its handler (the service runs with handler cancellation), which takes
it out of here at once.

Held requests are woken oldest first, so they are placed in the order they came; each
one's decision also counts the requests for the same name held before it
(`ahead()`): waiting for a busy copy means waiting behind them too.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rolemesh.decision import Decision, Reason
from rolemesh.errors import RoleMeshError


class Holdable(Exception):  # not an error: a request the dispatcher may hold
    """Every candidate is busy in a way that waiting can change soon (one at its pending
    limit, a busy copy worth waiting for, agents that answered busy or not ready): the
    request may be held. `error` is what the client gets when it cannot be."""

    def __init__(self, error: RoleMeshError, retry_after_s: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after_s = retry_after_s  # agents asked for this pause before a retry


def worth_holding(decision: Decision) -> bool:
    """A decision without a winner that a device freeing can change: not one where every
    candidate is down, draining, failed or too small (waiting would not help soon)."""
    return decision.waits_for is not None or any(
        v.reason is Reason.AT_PENDING_LIMIT for v in decision.verdicts)


@dataclass(eq=False)
class Ticket:
    seq: int
    name: str
    deadline: float
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Buffer:
    def __init__(self, max_requests: int, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_requests = max_requests
        self.timeout_s = timeout_s
        self._clock = clock
        self._held: dict[int, Ticket] = {}  # insertion order: oldest first
        self._seq = itertools.count()

    @property
    def enabled(self) -> bool:
        return self.max_requests > 0

    def __len__(self) -> int:
        return len(self._held)

    def admit(self, name: str) -> Ticket | None:
        """Hold one more request for `name`; None when the buffer is full (a 503 now)."""
        if len(self._held) >= self.max_requests:
            return None
        ticket = Ticket(next(self._seq), name, self._clock() + self.timeout_s)
        self._held[ticket.seq] = ticket
        return ticket

    def release(self, ticket: Ticket) -> None:
        self._held.pop(ticket.seq, None)

    def ahead(self, name: str, ticket: Ticket | None = None) -> int:
        """Requests for `name` held before `ticket` (all of them for a new request)."""
        return sum(1 for t in self._held.values()
                   if t.name == name and (ticket is None or t.seq < ticket.seq))

    async def wait(self, ticket: Ticket, not_before_s: float = 0.0) -> bool:
        """Until the next change, or the ticket's deadline (False: its time is up).

        `not_before_s`: after agents answered busy, at least that long (their Retry-After)
        even if a change comes sooner, so a device that keeps refusing is not asked again
        at every event."""
        start = self._clock()
        left = ticket.deadline - start
        if left <= 0:
            return False
        ticket.changed.clear()
        try:
            async with asyncio.timeout(left):
                await ticket.changed.wait()
                pause = start + not_before_s - self._clock()
                if pause > 0:
                    await asyncio.sleep(pause)
        except TimeoutError:
            return False
        return True

    def wake(self) -> None:
        """Something changed that may let a held request through: each decides again."""
        for ticket in self._held.values():
            ticket.changed.set()
