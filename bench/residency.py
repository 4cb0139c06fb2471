"""Model sets on a device: what co-residency saves, and what planning costs.

`python -m bench.residency [--quick]`

1. Alternation: a real node agent on the CPU device with the fake llama-server (each load
   takes `--load-s`), requests alternating between two models that fit together. The same
   run with `co_residency: false` (one model per device, every change a restart: the
   behaviour before model sets) is the baseline. Figures: model loads and p50/p95 latency,
   as ratios against the baseline.
2. `plan()`: the node's pure residency policy on a node with 8 devices x 16 models (half the
   models resident, waiters queued), p50/p99 per call, beside the per-request `choose()` on
   the same node as the yardstick.
3. The dispatcher's decision at 1,000 devices, every device holding 1-3 models, p50/p99, beside
   the previous decision (one model per device, loaded from git at the commit before model
   sets, when this is a git checkout).
4. Agent memory per resident instance: the agent's RSS with N instances ready, less with none,
   over N (the llama-server processes themselves are not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
import types
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp

from bench.report import emit_json, goal, goals_table, percentile, ratio, table
from bench.services import ROOT, Proc, agent_config, free_port, http_get, services, wait_until
from rolemesh.api import InstanceState
from rolemesh.decision import DeviceView, ModelCost, ResidentView, choose
from rolemesh.planner import InstanceView, ModelSpec, PlanView, WaiterView, instance_key, plan
from rolemesh.residency import Room
from rolemesh.tiny_gguf import DIGITS, LETTERS, write_tiny_model

FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"
LEGACY_COMMIT = "4939ff2"  # the last commit with one model per device


# -- 1. alternation through a real agent ---------------------------------------------------

async def alternate(url: str, n: int) -> list[float]:
    latencies = []
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            model = ("a", "b")[i % 2]
            started = time.perf_counter()
            async with s.post(url + "/v1/chat/completions", json={
                    "model": model, "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}]}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{model}: HTTP {resp.status}")
            latencies.append(time.perf_counter() - started)
    return latencies


def loads_of(proc: Proc) -> int:
    return sum(1 for e in proc.log_events() if e.get("event") == "instance.loading")


def alternation(workdir: Path, n: int, load_s: float) -> dict[str, Any]:
    a = write_tiny_model(workdir / "a.gguf", charset=LETTERS, seed=1)
    b = write_tiny_model(workdir / "b.gguf", charset=DIGITS, seed=2)
    rows = {}
    for label, co in (("co-residency", True), ("one model per device", False)):
        with services(workdir) as svc:
            port = free_port()
            models = [{"model_id": m, "path": str(p), "memory_mb": 100,
                       "server_args": {"--fake-load-delay-s": load_s}} for m, p in
                      (("a", a), ("b", b))]
            cfg = agent_config(node_id=f"bench-{int(co)}", port=port,
                               state_dir=workdir / f"state-{int(co)}", models=models,
                               llama_server_bin=str(FAKE), co_residency=co, log_level="info",
                               llama_server_probe_interval_s=0.02)
            path = svc.write_config(f"agent-{int(co)}", cfg)
            proc = svc.start_python(f"agent-{int(co)}", "node_agent.cli",
                                    ["--config", str(path)], port)
            latencies = asyncio.run(alternate(proc.url, n))
            rows[label] = {"requests": n, "loads": loads_of(proc),
                           "p50_ms": percentile(latencies, 50) * 1e3,
                           "p95_ms": percentile(latencies, 95) * 1e3}
    return rows


# -- 2. plan() on a big node ---------------------------------------------------------------

def big_node(seed: int = 5) -> PlanView:
    rng = random.Random(seed)
    devices = [f"gpu:{i}" for i in range(8)]
    rooms = {d: Room(rng.choice([24_000, 48_000, 80_000])) for d in devices}
    models = {f"m{i}": ModelSpec(f"m{i}", rng.randint(2_000, 20_000), load_s=rng.uniform(2, 30),
                                 demand=rng.randint(0, 50), ttl_s=600.0) for i in range(16)}
    instances = []
    for i, spec in enumerate(models.values()):
        if i % 2:
            continue
        d = devices[i % 8]
        instances.append(InstanceView(instance_key(spec.model_id, (d,)), spec.model_id, (d,),
                                      InstanceState.READY, {d: spec.need_mb},
                                      in_flight=rng.randint(0, 1), idle_since=0.0,
                                      ttl_s=600.0))
    waiters = [WaiterView(i, f"m{rng.randrange(16)}", (devices[rng.randrange(8)],),
                          rng.uniform(0, 10)) for i in range(12)]
    return PlanView(rooms=rooms, device_order=tuple(devices), models=models,
                    instances=tuple(instances), waiters=tuple(waiters))


def big_node_views(v: PlanView) -> list[DeviceView]:
    costs = {m: ModelCost(s.need_mb, s.load_s) for m, s in v.models.items()}
    return [DeviceView("n", d, costs, room.total_mb, None, tuple(
        ResidentView(i.model_id, i.state, busy=i.in_flight, charged_mb=i.charged_mb[d])
        for i in v.instances if d in i.devices), pending_limit=8) for d, room in v.rooms.items()]


def time_calls(fn: Any, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def planning(calls: int) -> dict[str, Any]:
    v = big_node()
    views = big_node_views(v)
    plan_s = time_calls(lambda: plan(v, 20.0), calls)
    choose_s = time_calls(lambda: choose(["m1", "m3"], views).verdicts, calls)
    return {"plan_p50_us": percentile(plan_s, 50) * 1e6,
            "plan_p99_us": percentile(plan_s, 99) * 1e6,
            "choose_p50_us": percentile(choose_s, 50) * 1e6,
            "choose_p99_us": percentile(choose_s, 99) * 1e6, "actions": len(plan(v, 20.0))}


# -- 3. the decision at 1,000 devices ------------------------------------------------------

def cluster(n: int, seed: int = 9) -> tuple[list[DeviceView], list[Any]]:
    rng = random.Random(seed)
    names = [f"m{i}" for i in range(8)]
    costs = {m: ModelCost(rng.randint(3_000, 20_000), rng.uniform(2, 30)) for m in names}
    new, old = [], []
    for i in range(n):
        total = rng.choice([24_000, 48_000, 80_000])
        held = rng.sample(names, rng.randint(1, 3))
        residents, used = [], 0
        for m in held:
            if used + costs[m].memory_need_mb <= total * 0.9:
                used += costs[m].memory_need_mb
                residents.append(ResidentView(m, busy=rng.randint(0, 1),
                                              charged_mb=costs[m].memory_need_mb))
        q = sum(r.busy for r in residents)
        new.append(DeviceView(f"n{i // 4}", f"gpu:{i % 4}", costs, total, total - used,
                              tuple(residents), in_flight=q, pending_limit=4,
                              recent_requests={m: rng.randint(0, 9) for m in names}))
        old.append((f"n{i // 4}", f"gpu:{i % 4}", costs, total, total - used,
                    residents[0].model_id if residents else None, q))
    return new, old


def legacy_decision() -> Any | None:
    """The one-model-per-device decision, from git (None outside a git checkout)."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show",
                                 f"{LEGACY_COMMIT}:rolemesh/decision.py"], capture_output=True,
                                text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None

    class SlotState(StrEnum):
        EMPTY = "empty"
        STARTING = "starting"
        READY = "ready"
        DRAINING = "draining"
        STOPPING = "stopping"
        FAILED = "failed"

    shim = types.ModuleType("_legacy_api")
    shim.SlotState = SlotState  # type: ignore[attr-defined]
    source = source.replace("from rolemesh.api import SlotState", "from _legacy_api import "
                            "SlotState")
    sys.modules["_legacy_api"] = shim
    spec = importlib.util.spec_from_loader("_legacy_decision", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_legacy_decision"] = module
    exec(compile(source, "legacy decision.py", "exec"), module.__dict__)
    module.SlotState = SlotState
    return module


def decision_at_scale(n: int, calls: int) -> dict[str, Any]:
    new, old_rows = cluster(n)
    rng = random.Random(3)
    asks = [[f"m{rng.randrange(8)}"] for _ in range(calls)]
    it = iter(asks * 2)
    new_s = time_calls(lambda: choose(next(it), new), calls)
    out: dict[str, Any] = {"devices": n, "p50_us": percentile(new_s, 50) * 1e6,
                           "p99_us": percentile(new_s, 99) * 1e6}
    legacy = legacy_decision()
    if legacy is not None:
        S = legacy.SlotState
        old = [legacy.DeviceView(node_id=a, device_id=b, servable={
            m: legacy.ModelCost(c.memory_need_mb, c.load_s) for m, c in costs.items()},
            memory_total_mb=t, memory_free_mb=f, loaded_model=lm,
            slot_state=S.READY if lm else S.EMPTY, in_flight=q, pending_limit=4)
            for a, b, costs, t, f, lm, q in old_rows]
        it2 = iter(asks * 2)
        old_s = time_calls(lambda: legacy.choose(next(it2), old), calls)
        out["legacy_p50_us"] = percentile(old_s, 50) * 1e6
        out["legacy_p99_us"] = percentile(old_s, 99) * 1e6
    return out


# -- 4. agent memory per instance ----------------------------------------------------------

def memory_per_instance(workdir: Path, n: int) -> dict[str, Any]:
    paths = [write_tiny_model(workdir / f"m{i}.gguf", charset=LETTERS, seed=10 + i)
             for i in range(n)]
    with services(workdir) as svc:
        port = free_port()
        models = [{"model_id": f"m{i}", "path": str(p), "memory_mb": 50, "preload": True}
                  for i, p in enumerate(paths)]
        idle = [{"model_id": "m0", "path": str(paths[0]), "memory_mb": 50}]
        rss = {}
        for label, ms in (("none", idle), ("all", models)):
            cfg = agent_config(node_id=f"mem-{label}", port=port, state_dir=workdir / label,
                               models=ms, llama_server_bin=str(FAKE),
                               max_pending_requests_per_device=n + 1)
            path = svc.write_config(f"mem-{label}", cfg)
            proc = svc.start_python(f"mem-{label}", "node_agent.cli", ["--config", str(path)],
                                    port)
            want = 0 if label == "none" else n

            def ready(proc: Proc = proc, want: int = want) -> bool:
                _, inv = http_get(proc.url + "/v1/node/inventory")
                return sum(1 for i in inv["devices"][0]["instances"]
                           if i["state"] == "ready") == want
            wait_until(ready, 60, f"{want} instances ready", proc)
            time.sleep(0.3)
            rss[label] = _own_rss_mb(proc.pid)
            proc.stop()
            port = free_port()
    return {"instances": n, "agent_rss_mb_none": rss["none"], "agent_rss_mb_all": rss["all"],
            "mb_per_instance": (rss["all"] - rss["none"]) / n}


def _own_rss_mb(pid: int) -> float:
    """The agent's own RSS, without its children's."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.residency", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the suite's smoke run)")
    p.add_argument("--load-s", type=float, default=0.5, help="each fake load takes this long")
    args = p.parse_args(argv)
    n_alt, calls, n_mem = (6, 200, 3) if args.quick else (40, 3000, 16)
    load_s = 0.1 if args.quick else args.load_s
    with tempfile.TemporaryDirectory() as tmp:
        alt = alternation(Path(tmp), n_alt, load_s)
        mem = memory_per_instance(Path(tmp), n_mem)
    plans = planning(calls)
    scale = decision_at_scale(100 if args.quick else 1000, calls)
    base = alt["one model per device"]
    co = alt["co-residency"]
    print("== alternating two models that fit together (fake llama-server, "
        f"{load_s:g} s loads, {n_alt} requests)")
    print(table(["config", "loads", "p50 ms", "p95 ms", "loads vs one-per-device",
               "p50 vs one-per-device"],
              [[k, v["loads"], v["p50_ms"], v["p95_ms"], ratio(v["loads"], base["loads"]),
                ratio(v["p50_ms"], base["p50_ms"])] for k, v in alt.items()]))
    plan_ratio = ratio(plans["plan_p99_us"], plans["choose_p99_us"])
    print(f"\n== plan() on 8 devices x 16 models: p50 {plans['plan_p50_us']:.1f} us, p99 "
          f"{plans['plan_p99_us']:.1f} us; choose() on the same node p99 "
          f"{plans['choose_p99_us']:.1f} us (ratio {plan_ratio:.2f})")
    line = (f"\n== choose() at {scale['devices']} devices: p50 {scale['p50_us']:.1f} us, p99 "
            f"{scale['p99_us']:.1f} us")
    if "legacy_p99_us" in scale:
        line += (f"; one-model-per-device decision p99 {scale['legacy_p99_us']:.1f} us (ratio "
                 f"{ratio(scale['p99_us'], scale['legacy_p99_us']):.2f})")
    print(line)
    print(f"\n== agent memory: {mem['mb_per_instance']:.2f} MB per resident instance "
        f"({mem['agent_rss_mb_none']:.1f} MB with none, {mem['agent_rss_mb_all']:.1f} MB "
        f"with {mem['instances']})")
    goals = [goal("alternation loads == 2 with co-residency", co["loads"] == 2,
                  str(co["loads"])),
             goal("alternation p50 below one-per-device", co["p50_ms"] < base["p50_ms"],
                  f"{ratio(co['p50_ms'], base['p50_ms']):.2f}x")]
    print("\n" + goals_table(goals))
    emit_json("residency", {"alternation": alt, "plan": plans, "decision": scale,
                            "memory": mem, "goals": goals})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
