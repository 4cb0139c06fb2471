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

Held requests decide again oldest first, one name at a time in turn (`Buffer._pass`), so
they are placed in the order they came; each one's decision also counts the requests for
the same name held before it (`ahead()`): waiting for a busy copy means waiting behind
them too. A request leaves the count the moment it is placed, not when it is answered.
The simulator's dispatcher holds requests by the same rules
(`rolemesh.simulate.engine`).
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
        self._held: dict[int, Ticket] = {}  # waiting, by seq: oldest first
        self._turn: dict[str, Ticket] = {}  # per name, the one woken to decide again
        self._seq = itertools.count()
        self._pass_due = False

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

    def placed(self, ticket: Ticket) -> None:
        """The ticket's request got a device: it no longer waits (nor takes a place, nor
        counts ahead of the newer ones), and the next of its name decides now."""
        if self._held.pop(ticket.seq, None) is not None:
            self._pass_turn(ticket)

    def readmit(self, ticket: Ticket) -> None:
        """A placed request that every device it tried refused (busy): back to its place
        in line, oldest first, even past the count (it was admitted once)."""
        if ticket.seq in self._held:
            return
        self._held[ticket.seq] = ticket
        self._held = dict(sorted(self._held.items()))

    def release(self, ticket: Ticket) -> None:
        """The request is done with the buffer (answered, failed, timed out or gone)."""
        self._held.pop(ticket.seq, None)
        self._pass_turn(ticket)

    def ahead(self, name: str, ticket: Ticket | None = None) -> int:
        """Requests for `name` waiting here before `ticket` (all of them for a new one)."""
        return sum(1 for t in self._held.values()
                   if t.name == name and (ticket is None or t.seq < ticket.seq))

    async def wait(self, ticket: Ticket, not_before_s: float = 0.0) -> bool:
        """Until its turn to decide again, or the ticket's deadline (False: its time is up).

        `not_before_s`: after agents answered busy, at least that long (their Retry-After)
        even if its turn comes sooner, so a device that keeps refusing is not asked again
        at every event."""
        if self._turn.get(ticket.name) is ticket:
            del self._turn[ticket.name]  # it decided and waits again: its name's turn ends
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
        """Something changed that may let a held request through. The changes of one
        moment make one pass, run once the caller is done (`_pass`)."""
        if self._pass_due or not self._held:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._pass()
            return
        self._pass_due = True
        loop.call_soon(self._pass)

    def _pass(self) -> None:
        """Per name, the oldest held request decides again; when it is placed the next of
        its name decides (`placed`), and when it must wait the rest of its name wait too:
        they would see the same devices, behind more held ahead of them. A request that
        arrives decides with all of them ahead, so a copy worth loading for the line is
        still loaded. A pass costs one decision per name held plus one per request
        placed, not one per request held (512 held x 1,000 devices at every heartbeat)."""
        self._pass_due = False
        for ticket in self._held.values():
            if ticket.name not in self._turn:
                self._give_turn(ticket)

    def _pass_turn(self, ticket: Ticket) -> None:
        if self._turn.get(ticket.name) is not ticket:
            return
        del self._turn[ticket.name]
        nxt = next((t for t in self._held.values() if t.name == ticket.name), None)
        if nxt is not None:
            self._give_turn(nxt)

    def _give_turn(self, ticket: Ticket) -> None:
        self._turn[ticket.name] = ticket
        ticket.changed.set()
