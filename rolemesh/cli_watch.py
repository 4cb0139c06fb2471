"""`rolemesh watch`: the dispatcher's event stream (`GET /v1/events`), one line per event.

    rolemesh watch            a snapshot line, then node up/down, loads, stops, requests
    rolemesh watch --json     the events as they come, one JSON object per line
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

EXIT_FAILED = 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser("watch", help="follow the cluster's events (GET /v1/events)")
    p.add_argument("--count", type=int, default=None,
                   help="stop after this many events (the snapshot included)")
    p.set_defaults(run=run)


def events(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an SSE byte stream (comments and keep-alives skipped)."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode(errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield json.loads("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def _secs(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def describe(e: dict[str, Any]) -> str:
    """One line for people."""
    t = e.get("type")
    where = f"{e.get('node_id')}/{e.get('device_id')}" if e.get("device_id") else e.get("node_id")
    if t == "snapshot":
        nodes = e.get("nodes", [])
        parts = []
        for n in nodes:
            devices = len(n.get("devices", []))
            parts.append(f"{n['node_id']} ({n['state']}, {devices} device"
                         f"{'s' if devices != 1 else ''})")
        return f"snapshot: {len(nodes)} node(s): {', '.join(parts) or 'none'}"
    if t == "request.done":
        return (f"request {e.get('name')} -> {e.get('model_id') or '-'} on {where or '-'}: "
                f"{e.get('outcome')} in {_secs(e.get('duration_s'))} "
                f"(first byte {_secs(e.get('ttft_s'))})")
    if t == "model.loaded":
        return f"loaded {e.get('model_id')} on {where}" + (
            f" in {_secs(e['load_s'])}" if e.get("load_s") else "")
    if t == "model.stopped":
        why = ": ".join(str(x) for x in (e.get("reason"), e.get("detail")) if x)
        return f"stopped {e.get('model_id')} on {where}: {why}"
    if t == "instance.state":
        return f"{e.get('model_id')} on {where}: {e.get('old')} -> {e.get('new')}"
    if t in ("node.up", "node.down", "node.forgotten"):
        why = f" ({e['why']})" if e.get("why") else ""
        return f"node {e.get('node_id')} {t.split('.', 1)[1]}{why}"
    return json.dumps(e)


def run(args: argparse.Namespace) -> int:
    request = urllib.request.Request(args.url.rstrip("/") + "/v1/events",
                                     headers={"Accept": "text/event-stream"})
    key = os.environ.get("ROLEMESH_API_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    seen = 0
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            for event in events(resp):
                print(json.dumps(event) if args.json else describe(event), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    return 0
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        print(f"rolemesh: {args.url}/v1/events: HTTP {exc.code}: {message}", file=sys.stderr)
        return EXIT_FAILED
    except (urllib.error.URLError, OSError) as exc:
        print(f"rolemesh: cannot reach {args.url}: {getattr(exc, 'reason', exc)}",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 0
    return 0
