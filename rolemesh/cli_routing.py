"""`rolemesh routing show|set FILE|edit`: the dispatcher's routing table, read and changed live.

    rolemesh routing show          the table, its version and the order the rules run in
    rolemesh routing set FILE      replace the table with FILE (YAML or JSON)
    rolemesh routing edit          open the table in $EDITOR, then PUT it back with If-Match

Writes need an admin key or the cluster token: $ROLEMESH_ADMIN_KEY, else $ROLEMESH_API_KEY.
A write based on a version that changed meanwhile gets 412 and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ADMIN_KEY_ENV = "ROLEMESH_ADMIN_KEY"


class RoutingCliError(Exception):
    pass


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("routing", help="the routing table: show, set FILE, edit")
    verbs = p.add_subparsers(dest="routing_command", required=True)
    verbs.add_parser("show", help="the table, its version and the order of the rules")
    s = verbs.add_parser("set", help="replace the table with FILE (YAML or JSON)")
    s.add_argument("file", type=Path)
    s.add_argument("--if-match", default=None,
                   help="only if the table is still at this version (an ETag or number)")
    verbs.add_parser("edit", help="edit the table in $EDITOR, PUT it back with If-Match")


def _call(base: str, method: str, key: str | None, body: bytes | None = None,
          if_match: str | None = None) -> tuple[dict[str, Any], str]:
    request = urllib.request.Request(base.rstrip("/") + "/v1/routing", data=body,
                                     method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if if_match:
        request.add_header("If-Match", if_match)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp), resp.headers.get("ETag", "")
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise RoutingCliError(f"HTTP {exc.code}: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise RoutingCliError(f"cannot reach {base}: {getattr(exc, 'reason', exc)}") from exc


def _etag(value: str | None) -> str | None:
    if value is None:
        return None
    return value if value.startswith('"') else f'"{value}"'


def read_table_file(path: Path) -> Any:
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as exc:
        raise RoutingCliError(f"{path}: {exc}") from exc
    if isinstance(data, dict) and "table" in data and "version" in data:
        data = data["table"]  # a saved `routing show --json`
    return data


def show(doc: dict[str, Any]) -> str:
    lines = [f"routing table version {doc['version']} (from {doc['source']}"
             + (f", kept in {doc['file']}" if doc.get("file") else "") + ")", "",
             "rules, first match wins:"]
    lines += [f"  {i}. {step}" for i, step in enumerate(doc.get("order", []), 1)]
    lines += ["", yaml.safe_dump(doc["table"], sort_keys=False).rstrip()]
    return "\n".join(lines)


def edit(base: str, key: str | None) -> str:
    doc, etag = _call(base, "GET", key)
    before = yaml.safe_dump(doc["table"], sort_keys=False)
    header = (f"# routing table version {doc['version']}: save and quit to apply, "
              "leave unchanged to cancel\n")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="rolemesh-routing-",
                                     delete=False) as f:
        f.write(header + before)
        path = Path(f.name)
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        code = subprocess.call([*shlex.split(editor), str(path)])
        if code != 0:
            raise RoutingCliError(f"{editor} exited with {code}; nothing changed")
        text = path.read_text()
        if yaml.safe_load(text) == yaml.safe_load(before):
            return "no change"
        new, _ = _call(base, "PUT", key, json.dumps(read_table_file(path)).encode(),
                       if_match=etag)
    except RoutingCliError as exc:
        raise RoutingCliError(f"{exc} (your edit is kept in {path})") from exc
    path.unlink(missing_ok=True)
    return f"routing table now at version {new['version']}"


def run(args: argparse.Namespace, url: str, key: str | None, as_json: bool) -> int:
    admin = os.environ.get(ADMIN_KEY_ENV) or key
    try:
        if args.routing_command == "show":
            doc, _ = _call(url, "GET", key)
            print(json.dumps(doc, indent=2) if as_json else show(doc))
        elif args.routing_command == "set":
            table = read_table_file(args.file)
            doc, _ = _call(url, "PUT", admin, json.dumps(table).encode(),
                           if_match=_etag(args.if_match))
            print(json.dumps(doc, indent=2) if as_json else
                  f"routing table now at version {doc['version']}")
        else:
            print(edit(url, admin))
    except RoutingCliError as exc:
        print(f"rolemesh routing: {exc}", file=sys.stderr)
        return 1
    return 0
