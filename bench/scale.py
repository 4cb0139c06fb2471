"""Decision and registry scale: how the choice grows with the cluster, and what heartbeats cost.

`python -m bench.scale [--quick]`

1. The pure decision, `rolemesh.decision.choose()`, over 10, 100, 1,000 and 10,000 devices
   of a mixed cluster (8 models, each node serving 3 to 5 of them, models loaded or not,
   queues, memory sizes, a few nodes down): p50/p99 per decision and the exponent of its
   growth (the slope of log time over log devices). Beside it, the dispatcher's whole
   in-process routing step (`Router.decide`: registry snapshot, device views, choose), fed
   the same cluster through a real `Registry`.
2. A real `rolemesh-dispatcher` process receiving heartbeats from simulated nodes (4
   devices each, every 5 s, spread evenly; a load generator of the bench's own, loopback):
   its CPU share, RSS, and heartbeat latency p99, beside `GET /health` latency measured in
   the same seconds (what any request costs there). Then more nodes are registered until
   the registry holds 10,000 devices, for its RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.procstat import CpuMeter, rss_mb
from bench.report import emit_json, goal, goals_table, percentile, say, table
from bench.services import HOST, Proc, dispatcher_config, free_port, services
from rolemesh.api import (
    DeviceStatus,
    HeartbeatRequest,
    InstanceState,
    InstanceStatus,
    ModelStatus,
    NodeInventory,
    RegisterRequest,
)
from rolemesh.decision import (
    DeviceView,
    ModelCost,
    Policy,
    ResidentView,
    ServiceTimes,
    _judge_all,
    choose,
)
from rolemesh.service import install_uvloop

MODELS = [f"model-{i}" for i in range(8)]
ROLES = {"chat": ["model-0", "model-1"], "coder": ["model-2"], "planner": ["model-3", "model-4"]}
MEMORY_MB = [8_192, 16_384, 24_576, 49_152, 81_920]
DEVICES_PER_NODE = 4


# -- a mixed cluster ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SimNode:
    node_id: str
    models: list[ModelStatus]
    devices: list[DeviceStatus]


def make_cluster(n_devices: int, seed: int = 7) -> list[SimNode]:
    """Nodes of 4 devices (the last may have fewer), each serving 3-5 of the 8 models."""
    rng = random.Random(seed)
    nodes = []
    n_nodes = math.ceil(n_devices / DEVICES_PER_NODE)
    for i in range(n_nodes):
        served = rng.sample(MODELS, rng.randint(3, 5))
        models = [ModelStatus(model_id=m, roles=[r for r, ms in ROLES.items() if m in ms],
                              file_size_mb=rng.randint(1_000, 40_000),
                              memory_need_mb=rng.randint(2_000, 44_000),
                              last_load_s=round(rng.uniform(0.5, 30.0), 3),
                              recent_requests=rng.randint(0, 50)) for m in served]
        count = min(DEVICES_PER_NODE, n_devices - i * DEVICES_PER_NODE)
        devices = [random_device(rng, f"gpu:{d}", served) for d in range(count)]
        nodes.append(SimNode(f"node-{i:05d}", models, devices))
    return nodes


def random_device(rng: random.Random, device_id: str, served: list[str]) -> DeviceStatus:
    """A device holding 0-2 instances (70 % hold at least one, 30 % of those a second)."""
    total = rng.choice(MEMORY_MB)
    count = (2 if rng.random() < 0.3 else 1) if rng.random() < 0.7 else 0
    loaded = rng.sample(served, count)
    used = rng.randint(total // 3, total) if loaded else rng.randint(0, total // 10)
    limit = 8
    in_flight = rng.randint(0, 4) if loaded else 0
    instances = [InstanceStatus(
        model_id=m, devices=[device_id],
        state=rng.choice([InstanceState.READY] * 8 + [InstanceState.STARTING,
                                                      InstanceState.DRAINING]),
        in_flight=in_flight if k == 0 else 0, parallel=4,
        memory_charged_mb=used // len(loaded)) for k, m in enumerate(loaded)]
    return DeviceStatus(device_id=device_id, name="Simulated GPU", backend="cuda",
                        memory_total_mb=total, memory_used_mb=used,
                        memory_free_mb=total - used, utilization_pct=None,
                        memory_charged_mb=sum(i.memory_charged_mb for i in instances),
                        instances=instances, in_flight=in_flight,
                        pending=rng.randint(0, limit - in_flight), pending_limit=limit,
                        failed_models={} if loaded or rng.random() < 0.9 else
                        {rng.choice(served): 2.0})


def device_views(nodes: list[SimNode], seed: int = 11) -> list[DeviceView]:
    rng = random.Random(seed)
    views = []
    for node in nodes:
        costs = {m.model_id: ModelCost(m.memory_need_mb, m.last_load_s or 5.0)
                 for m in node.models}
        recent = {m.model_id: m.recent_requests for m in node.models}
        up = rng.random() >= 0.03
        for d in node.devices:
            residents = tuple(ResidentView(i.model_id, i.state, busy=i.in_flight + i.queued,
                                           charged_mb=i.memory_charged_mb)
                              for i in d.instances)
            views.append(DeviceView(
                node_id=node.node_id, device_id=d.device_id, servable=costs,
                memory_total_mb=d.memory_total_mb, memory_free_mb=d.memory_free_mb,
                residents=residents, in_flight=d.in_flight,
                pending=d.pending, pending_limit=d.pending_limit, up=up,
                recent_requests=recent, failed=d.failed_models))
    return views


# -- 1. the decision ----------------------------------------------------------------------------

def time_calls(fn: Any, min_calls: int, min_s: float) -> list[float]:
    """Seconds per call, called at least min_calls times and for at least min_s."""
    samples = []
    clock = time.perf_counter
    deadline = clock() + min_s
    while len(samples) < min_calls or clock() < deadline:
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return samples


def slope(sizes: list[int], times: list[float]) -> float:
    """Least-squares exponent k of time ~ size^k."""
    xs = [math.log(s) for s in sizes]
    ys = [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def quiet_logs() -> None:
    """The in-process registry logs each registration; the bench wants only its tables."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def registry_for(nodes: list[SimNode]) -> Any:
    from dispatcher.registry import Registry

    registry = Registry(timeout_s=15.0, forget_s=60.0, clock=time.monotonic)
    for node in nodes:
        registry.register(NodeInventory(node_id=node.node_id, url="http://127.0.0.1:9",
                                        backend="cuda", seq=1, devices=node.devices,
                                        models=node.models))
    return registry


def time_after_heartbeats(registry: Any, router: Any, nodes: list[SimNode],
                          calls: int) -> list[float]:
    """Router.resolve + decide for a request that comes right after some node's heartbeat.

    In a real cluster heartbeats arrive all the time (200/s from 1,000 nodes), so this is
    what a request usually pays: whatever a heartbeat invalidates is rebuilt here.
    """
    beats = [HeartbeatRequest(node_id=nodes[i % len(nodes)].node_id, seq=2 + i,
                              devices=nodes[i % len(nodes)].devices,
                              models=nodes[i % len(nodes)].models) for i in range(calls)]
    samples = []
    for beat in beats:
        registry.heartbeat(beat)
        t0 = time.perf_counter()
        router.decide(router.resolve("model-3"))
        samples.append(time.perf_counter() - t0)
    return samples


def decision_scale(sizes: list[int], min_calls: int, min_s: float) -> dict[str, Any]:
    from dispatcher.router import Router

    rows = []
    policy = Policy()
    role_ids, service = tuple(ROLES["chat"]), ServiceTimes(None, policy)
    for n in sizes:
        nodes = make_cluster(n)
        views = device_views(nodes)
        say(f"  decision over {n} devices...")
        pure = time_calls(lambda v=views: choose(["model-3"], v, policy), min_calls, min_s)
        role = time_calls(lambda v=views: choose(ROLES["chat"], v, policy), min_calls, min_s)
        # The baseline, in the same run: every candidate judged (no fast path, no bound), as
        # choose() did before its branch and bound; /v1/route still reads this in full.
        role_all = time_calls(lambda v=views: _judge_all(role_ids, v, policy, service),
                              min_calls, min_s)
        registry = registry_for(nodes)
        router = Router(registry, {}, policy)
        resolution = router.resolve("model-3")
        routed = time_calls(lambda r=router, res=resolution: r.decide(res), min_calls, min_s)
        after_beat = time_after_heartbeats(registry, router, nodes, min_calls)
        decision = choose(["model-3"], views, policy)
        rows.append({
            "devices": n, "candidates": len(decision.verdicts),
            "outcome": decision.outcome.value,
            "choose_p50_us": percentile(pure, 50) * 1e6,
            "choose_p99_us": percentile(pure, 99) * 1e6,
            "choose_role_p50_us": percentile(role, 50) * 1e6,
            "role_all_judged_p50_us": percentile(role_all, 50) * 1e6,
            "role_action": getattr(choose(role_ids, views, policy).action, "value", None),
            "router_p50_us": percentile(routed, 50) * 1e6,
            "router_p99_us": percentile(routed, 99) * 1e6,
            "after_heartbeat_p50_us": percentile(after_beat, 50) * 1e6,
            "calls": len(pure),
        })
    base = rows[0]
    for row in rows:
        row["choose_p50_x_smallest"] = row["choose_p50_us"] / base["choose_p50_us"]
        row["per_device_ns"] = row["choose_p50_us"] * 1e3 / row["devices"]
    exps = {
        "choose": slope([r["devices"] for r in rows], [r["choose_p50_us"] for r in rows]),
        "router": slope([r["devices"] for r in rows], [r["router_p50_us"] for r in rows]),
    }
    if len(rows) >= 2:
        exps["choose_top_decade"] = slope([r["devices"] for r in rows[-2:]],
                                          [r["choose_p50_us"] for r in rows[-2:]])
    return {"rows": rows, "exponent": exps}


# -- 2. heartbeats into a real dispatcher -------------------------------------------------------

class Beats:
    """Pre-encoded heartbeat bodies, one per node; only `seq` changes between beats."""

    SEQ_MARK = 987_654_321

    def __init__(self, nodes: list[SimNode], port: int, token: str) -> None:
        self.parts: list[tuple[str, str]] = []
        for node in nodes:
            text = HeartbeatRequest(node_id=node.node_id, seq=self.SEQ_MARK,
                                    devices=node.devices, models=node.models
                                    ).model_dump_json()
            head, tail = text.split(str(self.SEQ_MARK), 1)
            self.parts.append((head, tail))
        self.request_head = (f"POST /v1/nodes/heartbeat HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                             f"Content-Type: application/json\r\n"
                             f"Authorization: Bearer {token}\r\n")
        self.seq = [1] * len(nodes)

    def request(self, i: int) -> bytes:
        self.seq[i] += 1
        head, tail = self.parts[i]
        body = f"{head}{self.seq[i]}{tail}".encode()
        return (self.request_head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def register_nodes(nodes: list[SimNode], port: int, token: str,
                         concurrency: int = 8) -> int:
    """POST /v1/nodes/register for each node; returns the number refused."""
    loop = asyncio.get_running_loop()
    queue = list(enumerate(nodes))
    failed = 0

    async def worker() -> None:
        nonlocal failed
        _, conn = await loop.create_connection(loadgen._Conn, HOST, port)
        while queue:
            _, node = queue.pop()
            body = RegisterRequest(inventory=NodeInventory(
                node_id=node.node_id, url=f"http://{HOST}:9", backend="cuda", seq=1,
                devices=node.devices, models=node.models)).model_dump_json().encode()
            raw = (f"POST /v1/nodes/register HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                   f"Content-Type: application/json\r\nAuthorization: Bearer {token}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            await conn.request(raw)
            if conn.status != 200:
                failed += 1
        assert conn.transport is not None
        conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed


@dataclass
class BeatResult:
    sent: int
    errors: int
    late: int  # beats that could not be sent on time (no free connection)
    latencies_s: list[float]
    health_latencies_s: list[float]
    wall_s: float
    cpu_s: float  # the dispatcher's
    loadgen_cpu_s: float


class _BeatSender:
    """Keep-alive connections to the dispatcher, and what came back on them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.free: list[loadgen._Conn] = []
        self.latencies: list[float] = []
        self.health: list[float] = []
        self.errors = self.late = self.sent = 0
        self.pending: set[asyncio.Future[None]] = set()

    async def connect(self) -> loadgen._Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(loadgen._Conn, HOST, self.port)
        return conn

    async def _send(self, conn: loadgen._Conn, raw: bytes) -> None:
        t0 = time.perf_counter()
        try:
            await conn.request(raw)
        except ConnectionError:
            self.errors += 1
            return
        self.latencies.append(time.perf_counter() - t0)
        if conn.status != 200:
            self.errors += 1
        self.free.append(conn)

    async def send(self, raw: bytes) -> None:
        if not self.free:  # every connection busy: this beat goes out late, on a new one
            self.late += 1
            self.free.append(await self.connect())
        task = asyncio.ensure_future(self._send(self.free.pop(), raw))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        self.sent += 1

    async def probe_health(self) -> None:
        conn = await self.connect()
        raw = f"GET /health HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n\r\n".encode()
        while True:
            t0 = time.perf_counter()
            await conn.request(raw)
            self.health.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)

    def close(self) -> None:
        for conn in self.free:
            if conn.transport is not None:
                conn.transport.close()


async def heartbeat_load(beats: Beats, port: int, interval_s: float, duration_s: float,
                         dispatcher_pid: int, connections: int = 16) -> BeatResult:
    """Every node beats once per interval, evenly spread; GET /health 20 times a second."""
    sender = _BeatSender(port)
    sender.free = [await sender.connect() for _ in range(connections)]
    n = len(beats.parts)
    step = interval_s / n
    meter = CpuMeter({"dispatcher": dispatcher_pid})
    meter.start()
    cpu0 = time.process_time()
    start = time.perf_counter()
    prober = asyncio.ensure_future(sender.probe_health())
    k = 0
    while k * step < duration_s:
        delay = start + k * step - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await sender.send(beats.request(k % n))
        k += 1
    if sender.pending:
        await asyncio.wait(sender.pending, timeout=10.0)
    wall = time.perf_counter() - start
    cpu = meter.stop()["dispatcher"]
    loadgen_cpu = time.process_time() - cpu0
    prober.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await prober
    sender.close()
    return BeatResult(sender.sent, sender.errors, sender.late, sender.latencies,
                      sender.health, wall, cpu, loadgen_cpu)


async def idle_share(pid: int, seconds: float) -> float:
    meter = CpuMeter({"p": pid})
    meter.start()
    await asyncio.sleep(seconds)
    return meter.stop()["p"] / seconds


async def dispatcher_scale(proc: Proc, token: str, nodes_hb: int, nodes_rss: int,
                           interval_s: float, duration_s: float,
                           profile_dir: Path | None = None,
                           profile_s: float = 8.0) -> dict[str, Any]:
    out: dict[str, Any] = {"rss_empty_mb": rss_mb(proc.pid)}
    out["idle_cpu_share"] = await idle_share(proc.pid, min(2.0, duration_s / 4))
    cluster = make_cluster(nodes_rss * DEVICES_PER_NODE)
    first = cluster[:nodes_hb]
    say(f"  registering {len(first)} nodes...")
    t0 = time.perf_counter()
    out["register_refused"] = await register_nodes(first, proc.port, token)
    out["register_per_s"] = len(first) / (time.perf_counter() - t0)
    beats = Beats(first, proc.port, token)
    say(f"  heartbeats from {len(first)} nodes x {DEVICES_PER_NODE} devices every "
        f"{interval_s:g} s for {duration_s:g} s...")
    # One interval to settle (every node has beaten once), then the measured window.
    await heartbeat_load(beats, proc.port, interval_s, min(interval_s, duration_s / 2),
                         proc.pid)
    res = await heartbeat_load(beats, proc.port, interval_s, duration_s, proc.pid)
    out["heartbeat"] = {
        "nodes": len(first), "devices": len(first) * DEVICES_PER_NODE,
        "beats_per_s": res.sent / res.wall_s, "sent": res.sent, "errors": res.errors,
        "late": res.late, "cpu_share": res.cpu_s / res.wall_s,
        "cpu_us_per_beat": res.cpu_s / max(1, res.sent) * 1e6,
        "p50_ms": percentile(res.latencies_s, 50) * 1e3,
        "p99_ms": percentile(res.latencies_s, 99) * 1e3,
        "health_p50_ms": percentile(res.health_latencies_s, 50) * 1e3,
        "health_p99_ms": percentile(res.health_latencies_s, 99) * 1e3,
        "loadgen_cpu_share": res.loadgen_cpu_s / res.wall_s,
    }
    out["heartbeat"]["p99_x_health_p99"] = (out["heartbeat"]["p99_ms"]
                                            / out["heartbeat"]["health_p99_ms"])
    out["rss_heartbeat_mb"] = rss_mb(proc.pid)
    rest = cluster[nodes_hb:]
    if rest:
        say(f"  registering {len(rest)} more nodes ({len(cluster) * DEVICES_PER_NODE} "
            "devices in all)...")
        out["register_refused"] += await register_nodes(rest, proc.port, token)
        beats_all = Beats(cluster, proc.port, token)
        # One full round of heartbeats from every node, so every record has been replaced.
        big = await heartbeat_load(beats_all, proc.port, interval_s, interval_s, proc.pid)
        out["all_nodes_beat"] = {"nodes": len(cluster), "cpu_share": big.cpu_s / big.wall_s,
                                 "p99_ms": percentile(big.latencies_s, 99) * 1e3,
                                 "errors": big.errors}
    if profile_dir is not None:
        from bench import profiling

        if profiling.available():
            say("  profiling the dispatcher under the heartbeat load...")
            running = profiling.start({"dispatcher": proc.pid}, profile_dir, profile_s)
            await heartbeat_load(beats, proc.port, interval_s, profile_s + 1, proc.pid)
            for spy, _ in running.values():
                spy.wait()
            out["profile"] = {name: profiling.summarise(path)
                              for name, (_, path) in running.items()}
        else:
            out["profile"] = {"skipped": "py-spy is not installed"}
    out["devices_rss"] = len(cluster) * DEVICES_PER_NODE
    out["rss_mb"] = rss_mb(proc.pid)
    return out


# -- the command --------------------------------------------------------------------------------

def render(decision: dict[str, Any], disp: dict[str, Any]) -> str:
    out = ["Decision time per call (p50 / p99, us); growth against the smallest cluster"]
    out.append(table(
        ["devices", "candidates", "choose p50", "choose p99", "x smallest", "ns/device",
         "role (2 models) p50", "its action", "role, all judged p50", "x all judged",
         "Router.decide p50", "p99", "after a heartbeat p50"],
        [[r["devices"], r["candidates"], r["choose_p50_us"], r["choose_p99_us"],
          r["choose_p50_x_smallest"], r["per_device_ns"], r["choose_role_p50_us"],
          r["role_action"], r["role_all_judged_p50_us"],
          f"{r['choose_role_p50_us'] / r['role_all_judged_p50_us']:.3f}",
          r["router_p50_us"], r["router_p99_us"], r["after_heartbeat_p50_us"]]
         for r in decision["rows"]], digits=1))
    out.append("(Router.decide: the dispatcher's registry snapshot + device views + choose; "
               "after a heartbeat: resolve + decide for a request that follows a heartbeat; "
               "role, all judged: every candidate judged, the baseline for choose's fast "
               "path and bound)")
    e = decision["exponent"]
    out.append(f"growth exponent (time ~ devices^k): choose k = {e['choose']:.2f}"
               + (f" (top decade {e['choose_top_decade']:.2f})" if "choose_top_decade" in e
                  else "") + f", Router.decide k = {e['router']:.2f}")
    out.append("")
    hb = disp["heartbeat"]
    out.append(f"Dispatcher under heartbeats: {hb['nodes']} nodes x {DEVICES_PER_NODE} devices, "
               f"{hb['beats_per_s']:.0f} heartbeats/s")
    rows = [
        ["CPU, share of one core", f"{hb['cpu_share']:.1%}",
         f"idle: {disp['idle_cpu_share']:.2%}"],
        ["CPU per heartbeat", f"{hb['cpu_us_per_beat']:.0f} us", ""],
        ["heartbeat latency p50 / p99", f"{hb['p50_ms']:.2f} / {hb['p99_ms']:.2f} ms",
         f"GET /health p50 / p99: {hb['health_p50_ms']:.2f} / {hb['health_p99_ms']:.2f} ms "
         f"(p99 x{hb['p99_x_health_p99']:.1f})"],
        ["errors / late sends", f"{hb['errors']} / {hb['late']}",
         f"load generator CPU: {hb['loadgen_cpu_share']:.1%} of a core"],
        ["RSS", f"{disp['rss_heartbeat_mb']:.0f} MB", f"empty: {disp['rss_empty_mb']:.0f} MB"],
    ]
    if "all_nodes_beat" in disp:
        a = disp["all_nodes_beat"]
        rows.append([f"at {a['nodes']} nodes: CPU share, p99", f"{a['cpu_share']:.1%}",
                     f"p99 {a['p99_ms']:.2f} ms, errors {a['errors']}"])
    rows.append([f"RSS at {disp['devices_rss']} devices", f"{disp['rss_mb']:.0f} MB",
                 f"{(disp['rss_mb'] - disp['rss_empty_mb']) * 1024 / disp['devices_rss']:.1f} "
                 "KB per device over empty"])
    out.append(table(["figure", "value", "beside it"], rows))
    return "\n".join(out)


def render_profile(profile: dict[str, Any]) -> str:
    if "skipped" in profile:
        return f"profile: skipped: {profile['skipped']}"
    out = []
    for name, summary in profile.items():
        out.append(f"profile, heartbeats, {name}: {summary['samples']} samples on CPU; "
                   "share by function, self | inclusive")
        rows = [[f, f"{share:.1%}", g, f"{gshare:.1%}"] for (f, share), (g, gshare)
                in zip(summary["self"], summary["inclusive"], strict=False)]
        out.append(table(["self", "%", "inclusive", "%"], rows))
    return "\n".join(out)


def evaluate(decision: dict[str, Any], disp: dict[str, Any]) -> list[dict[str, Any]]:
    goals = []
    at_1000 = next((r for r in decision["rows"] if r["devices"] == 1000), None)
    if at_1000 is not None:
        goals.append(goal("decision p99 <= 50 us at 1,000 devices",
                          at_1000["choose_p99_us"] <= 50.0,
                          f"{at_1000['choose_p99_us']:.0f} us (choose), "
                          f"{at_1000['router_p99_us']:.0f} us (Router.decide)"))
    k = decision["exponent"]["choose"]
    goals.append(goal("decision grows near linear or better", k <= 1.15, f"k = {k:.2f}"))
    hb = disp["heartbeat"]
    goals.append(goal(f"{hb['nodes']}-node heartbeat load <= 5 % of one core",
                      hb["cpu_share"] <= 0.05 if hb["nodes"] >= 1000 else None,
                      f"{hb['cpu_share']:.1%}",
                      "" if hb["nodes"] >= 1000 else "smoke size: not the goal's load"))
    goals.append(goal(f"RSS <= 200 MB at {disp['devices_rss']} devices",
                      disp["rss_mb"] <= 200 if disp["devices_rss"] >= 10_000 else None,
                      f"{disp['rss_mb']:.0f} MB",
                      "" if disp["devices_rss"] >= 10_000 else "smoke size"))
    errors = hb["errors"] + disp.get("register_refused", 0)
    goals.append(goal("no heartbeat or registration errors", errors == 0, str(errors)))
    return goals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--sizes", default=None, help="device counts, e.g. 10,100,1000,10000")
    parser.add_argument("--nodes", type=int, default=None,
                        help="nodes sending heartbeats (default 1000)")
    parser.add_argument("--rss-devices", type=int, default=None,
                        help="devices registered in all for the RSS figure (default 10000)")
    parser.add_argument("--interval", type=float, default=5.0, help="heartbeat interval, s")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of measured heartbeat load (default 30)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after the measured window, py-spy the dispatcher under the "
                             "heartbeat load (all nodes) and keep the folded stacks in DIR")
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    quick = args.quick
    sizes = [int(s) for s in (args.sizes or ("10,100,1000" if quick else "10,100,1000,10000")
                              ).split(",")]
    nodes_hb = args.nodes or (50 if quick else 1000)
    rss_devices = args.rss_devices or (400 if quick else 10_000)
    nodes_rss = max(nodes_hb, math.ceil(rss_devices / DEVICES_PER_NODE))
    interval = 1.0 if quick and args.interval == 5.0 else args.interval
    duration = args.duration or (2.0 if quick else 30.0)
    install_uvloop()

    quiet_logs()
    say("timing the decision...")
    decision = decision_scale(sizes, min_calls=20 if quick else 300,
                              min_s=0.05 if quick else 1.0)
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="rolemesh-bench-") as tmp, \
            services(Path(tmp)) as svc:
        port = free_port()
        cfg = svc.write_config("dispatcher", dispatcher_config(
            port=port, token=token, heartbeat_interval_s=interval))
        say("starting the dispatcher...")
        proc = svc.start_python("dispatcher", "dispatcher.cli", ["--config", str(cfg)], port)
        disp = asyncio.run(dispatcher_scale(proc, token, nodes_hb, nodes_rss, interval,
                                            duration, args.profile, args.profile_seconds))
        if proc.popen.poll() is not None:
            say(f"the dispatcher exited:\n{proc.log()[-2000:]}")
            return 1
    goals = evaluate(decision, disp)
    print(render(decision, disp))
    print()
    print(goals_table(goals))
    if "profile" in disp:
        print()
        print(render_profile(disp["profile"]))
    emit_json("scale", {"decision": decision, "dispatcher": disp, "goals": goals,
                        "interval_s": interval, "duration_s": duration})
    return 0 if disp["heartbeat"]["errors"] == 0 and not disp["register_refused"] else 1


if __name__ == "__main__":
    sys.exit(main())
