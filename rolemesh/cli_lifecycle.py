"""`rolemesh load|unload|drain|undrain|mode|optimize`: the operator's residency verbs.

    rolemesh load MODEL [--node N] [--device gpu:0]   load a model (where it fits best)
    rolemesh unload MODEL [--node N] [--device D]     unload every copy, or one
    rolemesh drain NODE / undrain NODE                no new requests there; its models go
    rolemesh mode NODE DEVICE SET|auto                hold a device for a named set
    rolemesh optimize [NODE]                          pinned models back to their best device

They need the cluster token or an admin key ($ROLEMESH_ADMIN_KEY, else $ROLEMESH_API_KEY).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

VERBS = ("load", "unload", "drain", "undrain", "mode", "optimize")


class LifecycleError(Exception):
    pass


def post(base: str, path: str, key: str | None, payload: dict[str, Any]) -> Any:
    request = urllib.request.Request(base.rstrip("/") + path, method="POST",
                                     data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=660) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise LifecycleError(f"{base}{path}: HTTP {exc.code}: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise LifecycleError(f"cannot reach {base}: {getattr(exc, 'reason', exc)}") from exc


def add_parsers(sub: Any) -> None:
    for verb in ("load", "unload"):
        p = sub.add_parser(verb, help=f"{verb} a model (every copy for unload, or one)")
        p.add_argument("model")
        p.add_argument("--node", default=None)
        p.add_argument("--device", default=None, help="gpu:N, or gpu:0+gpu:1 for a group")
    for verb in ("drain", "undrain"):
        p = sub.add_parser(verb, help=f"{verb} a node")
        p.add_argument("node")
    m = sub.add_parser("mode", help="hold a device for a named set, or 'auto' to release it")
    m.add_argument("node")
    m.add_argument("device")
    m.add_argument("set", help="a set name from the node's config, or 'auto'")
    o = sub.add_parser("optimize", help="move pinned models back to their best device")
    o.add_argument("node", nargs="?", default=None)


def run(args: argparse.Namespace, key: str | None) -> tuple[Any, str]:
    """Carry out a verb; returns (the JSON answer, a line for people)."""
    key = os.environ.get("ROLEMESH_ADMIN_KEY") or key  # an operator's key first
    q = urllib.parse.quote
    match args.command:
        case "load" | "unload":
            payload = {k: v for k, v in (("node", args.node), ("device", args.device)) if v}
            data = post(args.url, f"/v1/models/{q(args.model, safe='')}/{args.command}", key,
                        payload)
            if args.command == "load":
                where = "+".join(data.get("devices", [])) or "?"
                text = (f"{args.model} loaded on {data.get('node_id')}/{where} "
                        f"({data.get('state')}, {data.get('last_load_s')}s)")
            else:
                gone = [f"{u['node_id']}/{u['devices']}" for u in data.get("unloaded", [])]
                text = (f"{args.model} unloaded from {', '.join(gone)}" if gone else
                        f"{args.model} was not loaded anywhere")
        case "drain" | "undrain":
            data = post(args.url, f"/v1/nodes/{q(args.node, safe='')}/{args.command}", key, {})
            text = f"{args.node}: {'draining' if data.get('draining') else 'taking requests'}"
        case "mode":
            data = post(args.url, f"/v1/nodes/{q(args.node, safe='')}/mode", key,
                        {"device": args.device, "set": args.set})
            text = f"{args.node}/{args.device}: mode {data.get('mode')}"
        case _:
            path = f"/v1/nodes/{q(args.node, safe='')}/optimize" if args.node else "/v1/optimize"
            data = post(args.url, path, key, {})
            started = sum(n.get("started", 0) for n in data.get("nodes", []))
            text = f"optimize: {started} instance(s) started on a better device"
    return data, text
