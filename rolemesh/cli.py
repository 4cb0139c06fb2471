"""`rolemesh`: the operator's view of a running cluster (or of one node agent).

    rolemesh status                 dispatcher health and a line per node
    rolemesh nodes                  every device and its instances: state, queue, memory, TTL
    rolemesh models                 every role, alias and model id served now
    rolemesh route MODEL            which device a request for MODEL would go to, and why
    rolemesh check-fit FILE.gguf    a model's memory need, and which devices it fits
    rolemesh load|unload MODEL      load a model where it fits best, or unload its copies
    rolemesh drain|undrain NODE     stop routing to a node and unload its models, or resume
    rolemesh mode NODE DEVICE SET   hold a device for a named set ('auto' releases it)
    rolemesh optimize [NODE]        move pinned models back to their best device
                                    (exit 4 when a request for MODEL would be refused)
    rolemesh watch                  the cluster's events as they happen (rolemesh/cli_watch.py)
    rolemesh up                     a dispatcher and a node agent on this host (cli_up.py)
    rolemesh routing show|set|edit  the routing table: task types, rules (rolemesh/cli_routing.py)
    rolemesh check-fit FILE.gguf    a model's memory need per device and in host RAM, and
                                    where it fits (rolemesh/cli_memory.py)
    rolemesh simulate --cluster F   replay a trace against a described cluster (simulated)

The dispatcher is at --url or $ROLEMESH_URL (default http://127.0.0.1:8080); a key, when
the dispatcher wants one, comes from $ROLEMESH_API_KEY. --json prints the raw answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rolemesh import (
    cli_lifecycle,
    cli_memory,
    cli_ops,
    cli_routing,
    cli_simulate,
    cli_up,
    cli_watch,
)

DEFAULT_URL = "http://127.0.0.1:8080"


class CliError(Exception):
    pass


def fetch(base: str, path: str, key: str | None) -> Any:
    request = urllib.request.Request(base.rstrip("/") + path)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        said = cli_ops.agent_message(base, path, key) if exc.code == 404 else None
        if said is not None:
            raise CliError(said) from exc
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise CliError(f"{base}{path}: HTTP {exc.code}: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach {base}: {getattr(exc, 'reason', exc)}") from exc


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def _mb(value: int | None) -> str:
    return "?" if value is None else f"{value / 1024:.1f}G" if value >= 1024 else f"{value}M"


def _node_state(n: dict[str, Any]) -> str:
    return f"{n['state']} (draining)" if n.get("draining") else str(n["state"])


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s"


def show_status(health: dict[str, Any], nodes: dict[str, Any]) -> str:
    rows = []
    for n in nodes.get("data", []):
        resident = []
        for d in n["devices"]:
            models = [i["model_id"] for i in d["status"].get("instances", [])]
            resident.append(f"{d['status']['device_id']}: {', '.join(models) or '-'}")
        rows.append([n["node_id"], _node_state(n), n["url"], str(len(n["devices"])),
                     "; ".join(resident), f"{n['last_heartbeat_age_s']:.1f}s"])
    head = (f"dispatcher: {health.get('status')}  nodes up: {health.get('nodes_up')}  "
            f"down: {health.get('nodes_down')}")
    return head + "\n\n" + table(rows, ["NODE", "STATE", "URL", "DEVICES", "RESIDENT",
                                        "HEARTBEAT"])


def show_nodes(nodes: dict[str, Any]) -> str:
    """A row per instance, under its device's figures (given on the device's first row)."""
    rows = []
    for n in nodes.get("data", []):
        for d in n["devices"]:
            s = d["status"]
            device = [n["node_id"], _node_state(n), s["device_id"], s["name"][:24],
                      f"{_mb(s['memory_free_mb'])}/{_mb(s['memory_total_mb'])}",
                      f"{s['in_flight']}+{s['pending']}/{s['pending_limit']}",
                      s.get("mode") or "auto"]
            lines = []
            for i in s.get("instances", []):
                ttl = "pinned" if i.get("pinned") else _seconds(i.get("ttl_left_s"))
                state = i["state"] + (f" ({i['draining_for']})" if i.get("draining_for")
                                      else "")
                lines.append([i["model_id"], state, f"{i['in_flight']}+{i['queued']}",
                              _mb(i["memory_charged_mb"]), ttl])
            for model, backoff in sorted(s.get("failed_models", {}).items()):
                lines.append([model, f"failed (retry in {backoff:.0f}s)", "-", "-", "-"])
            for k, line in enumerate(lines or [["-", "", "", "", ""]]):
                rows.append((device if k == 0 else [""] * len(device)) + line)
    return table(rows, ["NODE", "STATE", "DEVICE", "NAME", "FREE/TOTAL", "QUEUE", "MODE",
                        "MODEL", "INSTANCE", "IN+Q", "CHARGED", "TTL LEFT"])


def show_models(models: dict[str, Any]) -> str:
    rows = [[m["id"], m.get("kind", "model"), ", ".join(m.get("models") or m.get("roles") or [])]
            for m in models.get("data", [])]
    return table(rows, ["NAME", "KIND", "MODELS / ROLES"])


def show_route(route: dict[str, Any]) -> str:
    lines = [f"{route.get('model')}: {route.get('explanation')}"]
    if route.get("error"):
        err = route["error"]
        lines.append(f"a request now would get HTTP {err['status']} {err['code']}: "
                     f"{err['message']}")
    rows = [["*" if c["chosen"] else "", c["node_id"], c["device_id"], c["model_id"],
             c["reason"], str(c["queue"]), _mb(c["memory_need_mb"]),
             f"{_mb(c['memory_free_mb'])}/{_mb(c['memory_total_mb'])}",
             "" if c["eviction_cost"] is None else f"{c['eviction_cost']:g}"]
            for c in route.get("candidates", [])]
    if rows:
        lines += ["", table(rows, ["", "NODE", "DEVICE", "MODEL", "REASON", "QUEUE", "NEED",
                                   "FREE/TOTAL", "EVICT COST"])]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rolemesh", description="Operate a RoleMesh cluster.")
    p.add_argument("--url", default=os.environ.get("ROLEMESH_URL", DEFAULT_URL),
                   help="the dispatcher (default $ROLEMESH_URL or %(default)s)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="dispatcher health and one line per node")
    sub.add_parser("nodes", help="every device of every node")
    sub.add_parser("models", help="roles, aliases and model ids served now")
    for name in ("route", "explain"):
        r = sub.add_parser(name, help="where a request for MODEL would go, and why")
        r.add_argument("model")
    cli_watch.add_parser(sub)
    cli_up.add_parser(sub)
    cli_memory.add_parser(sub)
    cli_routing.add_parser(sub)
    cli_simulate.add_parser(sub)
    cli_lifecycle.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(cli_ops.hoist_global_flags(argv))
    if getattr(args, "run", None) is not None:  # verbs in modules of their own (watch, up)
        return int(args.run(args))
    if args.command == "simulate":
        return cli_simulate.run(args)
    key = os.environ.get("ROLEMESH_API_KEY")
    if args.command == "routing":
        return cli_routing.run(args, args.url, key, args.json)
    try:
        if args.command == "check-fit":
            offline = args.offline or args.device_mb
            nodes = None if offline else fetch(args.url, "/v1/nodes", key)
            text, fits = cli_memory.check_fit(args, nodes, table)
            print(text)
            return 0 if fits else cli_memory.EXIT_DOES_NOT_FIT
        if args.command in cli_lifecycle.VERBS:
            answer, said = cli_lifecycle.run(args, key)
            print(json.dumps(answer, indent=2) if args.json else said)
            return 0
        if args.command == "status":
            data: Any = {"health": fetch(args.url, "/health", key),
                         "nodes": fetch(args.url, "/v1/nodes", key)}
            text = show_status(data["health"], data["nodes"]) if not args.json else ""
        elif args.command == "nodes":
            data = fetch(args.url, "/v1/nodes", key)
            text = show_nodes(data) if not args.json else ""
        elif args.command == "models":
            data = fetch(args.url, "/v1/models", key)
            text = show_models(data) if not args.json else ""
        else:
            query = urllib.parse.urlencode({"model": args.model})
            data = fetch(args.url, f"/v1/route?{query}", key)
            text = show_route(data) if not args.json else ""
    except (CliError, cli_memory.CheckFitError, cli_lifecycle.LifecycleError) as exc:
        print(f"rolemesh: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else text)
    if args.command in ("route", "explain") and data.get("error"):
        return cli_ops.EXIT_REFUSED  # a request for that name would be refused now
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
