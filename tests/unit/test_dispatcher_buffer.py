"""The dispatcher's buffer (dispatcher/buffering.py) on its own: who decides again at a
change, in which order, and what a placed request stops counting for. The forwarding
loop around it is driven here by a table of free slots instead of real devices; the
component tests (tests/component/test_dispatcher_buffering.py) run the real dispatcher."""

from __future__ import annotations

import asyncio

from dispatcher.buffering import Buffer, Ticket


class Slots:
    """Free device slots per name, and a log of every decision made."""

    def __init__(self) -> None:
        self.free: dict[str, int] = {}
        self.decisions: list[str] = []
        self.placed: list[str] = []


async def held_request(buffer: Buffer, slots: Slots, name: str, label: str) -> None:
    """What dispatcher/forwarding.py does for a request every device refused: hold it,
    decide again at its turn, until placed."""
    ticket = buffer.admit(name)
    assert ticket is not None
    try:
        while await buffer.wait(ticket):
            slots.decisions.append(label)
            if slots.free.get(name, 0) > 0:
                slots.free[name] -= 1
                buffer.placed(ticket)
                slots.placed.append(label)
                return
    finally:
        buffer.release(ticket)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def start(buffer: Buffer, slots: Slots, labels: list[tuple[str, str]]
                ) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(held_request(buffer, slots, name, label))
             for name, label in labels]
    await settle()
    return tasks


async def hang_up(tasks: list[asyncio.Task[None]]) -> None:
    """Every client leaves (their handlers are cancelled), as at the end of each test."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_change_wakes_the_oldest_of_each_name_not_every_held_request():
    buffer, slots = Buffer(512, 60), Slots()
    tasks = await start(buffer, slots, [("coder", f"c{i}") for i in range(200)]
                        + [("planner", "p0"), ("planner", "p1")])
    for _ in range(10):  # ten heartbeats, nothing freed
        buffer.wake()
        await settle()
    # Each change: the oldest coder and the oldest planner decide, and wait again.
    assert slots.decisions == ["c0", "p0"] * 10
    assert len(buffer) == 202
    await hang_up(tasks)
    assert len(buffer) == 0


async def test_changes_of_one_moment_make_one_pass():
    buffer, slots = Buffer(16, 60), Slots()
    tasks = await start(buffer, slots, [("coder", "c0"), ("coder", "c1")])
    for _ in range(50):  # a burst of answers' headers in the same tick
        buffer.wake()
    await settle()
    assert slots.decisions == ["c0"]
    await hang_up(tasks)


async def test_slots_that_free_are_taken_oldest_first_and_the_next_decides_at_once():
    buffer, slots = Buffer(16, 60), Slots()
    tasks = await start(buffer, slots, [("coder", f"c{i}") for i in range(5)])
    slots.free["coder"] = 3  # a device with 3 parallel slots finished its requests
    buffer.wake()
    await settle()
    assert slots.placed == ["c0", "c1", "c2"]
    assert slots.decisions == ["c0", "c1", "c2", "c3"]  # c3 found none and waits; c4 too
    assert len(buffer) == 2
    await hang_up(tasks)


async def test_a_placed_request_leaves_the_count_and_the_line_at_once():
    buffer = Buffer(1, 60)
    first = buffer.admit("coder")
    assert first is not None
    assert buffer.admit("coder") is None  # full: the next one would get the 503
    buffer.placed(first)  # its answer is still streaming, but it waits no more
    second = buffer.admit("coder")
    assert second is not None
    assert buffer.ahead("coder") == 1
    assert buffer.ahead("coder", second) == 0  # the placed one is not ahead of it


async def test_a_placed_request_every_device_refused_goes_back_to_its_place():
    buffer = Buffer(4, 60)
    tickets = [buffer.admit("coder") for _ in range(3)]
    assert all(isinstance(t, Ticket) for t in tickets)
    a, b, c = (t for t in tickets if t is not None)
    buffer.placed(a)
    assert buffer.ahead("coder", c) == 1
    buffer.readmit(a)  # the agents it tried answered busy
    assert buffer.ahead("coder", b) == 1
    assert buffer.ahead("coder", c) == 2
    buffer.readmit(a)  # twice is once
    assert len(buffer) == 3


async def test_a_woken_request_whose_client_leaves_passes_its_turn_on():
    buffer, slots = Buffer(16, 60), Slots()
    tasks = await start(buffer, slots, [("coder", "c0"), ("coder", "c1"), ("coder", "c2")])
    slots.free["coder"] = 1
    buffer.wake()
    tasks[0].cancel()  # c0's client hangs up before its turn runs
    await settle()
    assert slots.placed == ["c1"]
    assert slots.decisions == ["c1", "c2"]
    await hang_up(tasks)
    assert len(buffer) == 0


async def test_a_held_request_times_out_at_its_deadline():
    buffer, slots = Buffer(16, 0.05), Slots()
    task = asyncio.create_task(held_request(buffer, slots, "coder", "c0"))
    await asyncio.wait_for(task, 5)  # no change came: wait() says its time is up
    assert slots.decisions == []
    assert len(buffer) == 0
