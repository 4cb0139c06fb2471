"""What a change costs the dispatcher while requests are held in its buffer.

`python -m bench.held [--quick]`

The real `Registry`, `Router` and `Buffer` (dispatcher/buffering.py) in one process, over
the mixed cluster of `bench.scale` (1,000 devices, 8 models). `--held` requests (512, the
default `max_buffered_requests`) wait, spread over the 8 model names, each in the loop
dispatcher/forwarding.py runs: at its turn, decide again with `Router.decide` (the real
decision, with the requests held ahead of it) and, as no device frees here, wait again.
Then requests end at devices one at a time (each a real `Registry.end`, which tells the
buffer), and the bench times each from the end until every woken request has decided.
(Heartbeats that only refresh figures no longer wake the buffer at all: see
tests/unit/test_dispatcher_registry.py.) The baseline, run in the same process on the same
cluster, is the previous rule: every held request decides again at every change.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from bench.report import emit_json, goal, goals_table, percentile, say, table
from bench.scale import MODELS, make_cluster, quiet_logs, registry_for
from dispatcher.buffering import Buffer
from rolemesh.decision import Policy


class EveryHeldDecides(Buffer):
    """The rule before: a change wakes every held request."""

    def _pass(self) -> None:
        self._pass_due = False
        for ticket in self._held.values():
            ticket.changed.set()


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def one_rule(buffer_type: type[Buffer], n_devices: int, held: int, changes: int
                   ) -> dict[str, Any]:
    from dispatcher.router import Router

    nodes = make_cluster(n_devices)
    registry = registry_for(nodes)
    router = Router(registry, {}, Policy())
    buffer = buffer_type(held, 3600.0)
    registry.listeners.append(buffer.wake)
    decisions = 0

    async def held_request(name: str) -> None:
        nonlocal decisions
        resolution = router.resolve(name)
        ticket = buffer.admit(name)
        assert ticket is not None
        try:
            while await buffer.wait(ticket):
                router.decide(resolution, held_ahead=buffer.ahead(name, ticket))
                decisions += 1  # nothing frees here: it waits again
        finally:
            buffer.release(ticket)

    tasks = [asyncio.create_task(held_request(MODELS[i % len(MODELS)])) for i in range(held)]
    await settle()
    samples = []
    for i in range(changes):
        node = nodes[i % len(nodes)]
        key = (node.node_id, node.devices[0].device_id)
        registry.begin(key, node.models[0].model_id)
        before = decisions
        t0 = time.perf_counter()
        registry.end(key, node.models[0].model_id)  # a request ended: the buffer hears it
        while True:  # until the pass is over: every woken one has decided
            await settle()
            if decisions > before and all(
                    not t.changed.is_set() for t in buffer._held.values()):
                break
        samples.append((time.perf_counter() - t0, decisions - before))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    times = [s for s, _ in samples]
    return {"p50_ms": percentile(times, 50) * 1e3, "p99_ms": percentile(times, 99) * 1e3,
            "decisions_per_change": sum(n for _, n in samples) / len(samples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.held", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--devices", type=int, default=None, help="default 1000")
    parser.add_argument("--held", type=int, default=None, help="default 512")
    parser.add_argument("--changes", type=int, default=None, help="default 40")
    args = parser.parse_args(argv)
    devices = args.devices or (100 if args.quick else 1000)
    held = args.held or (64 if args.quick else 512)
    changes = args.changes or (5 if args.quick else 40)
    quiet_logs()
    rows = {}
    for label, rule in (("name by name (now)", Buffer), ("every held decides", EveryHeldDecides)):
        say(f"  {label}: {held} held, {devices} devices...")
        rows[label] = asyncio.run(one_rule(rule, devices, held, changes))
    now, before = rows["name by name (now)"], rows["every held decides"]
    ratio = now["p50_ms"] / before["p50_ms"]
    print(f"One change (a request ends) with {held} requests held over {len(MODELS)} names, "
          f"{devices} devices: ms from the change until every woken request decided")
    print(table(["rule", "decisions per change", "p50 ms", "p99 ms", "p50 x baseline"],
                [[label, r["decisions_per_change"], r["p50_ms"], r["p99_ms"],
                  r["p50_ms"] / before["p50_ms"]] for label, r in rows.items()]))
    goals = [goal("a change costs one decision per name held, not per request",
                  now["decisions_per_change"] <= len(MODELS),
                  f"{now['decisions_per_change']:.1f} vs {before['decisions_per_change']:.1f}"),
             goal("a change costs less than with every held request deciding", ratio < 1,
                  f"{ratio:.3f}x")]
    print()
    print(goals_table(goals))
    emit_json("held", {"devices": devices, "held": held, "changes": changes, "rules": rows,
                       "goals": goals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
