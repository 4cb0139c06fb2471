"""Small pieces of the `rolemesh` CLI that make it forgiving: flags anywhere, clear 404s.

- `--json` and `--url URL` are global flags; people type them after the verb too
  (`rolemesh models --json`), so they are moved in front before parsing.
- `rolemesh status` / `nodes` pointed at a node agent get a 404 for `/v1/nodes`; say that
  this is an agent (and which node) instead.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

EXIT_REFUSED = 4  # `rolemesh route NAME`: a request for NAME would be refused now
GLOBAL_FLAGS = ("--json",)
GLOBAL_OPTIONS = ("--url",)


def hoist_global_flags(argv: Sequence[str] | None) -> list[str]:
    """argv with the global flags moved before the verb (nothing after a `--` moves)."""
    args = list(sys.argv[1:] if argv is None else argv)
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg in GLOBAL_FLAGS:
            front.append(arg)
        elif arg in GLOBAL_OPTIONS and i + 1 < len(args):
            front += [arg, args[i + 1]]
            i += 1
        elif any(arg.startswith(o + "=") for o in GLOBAL_OPTIONS):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def agent_at(base: str, key: str | None) -> str | None:
    """The node id when `base` is a RoleMesh node agent (its /health names one), else None."""
    request = urllib.request.Request(base.rstrip("/") + "/health")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    node_id = body.get("node_id") if isinstance(body, dict) else None
    return str(node_id) if node_id else None


def agent_message(base: str, path: str, key: str | None) -> str | None:
    """What to say about a 404 for a dispatcher-only path when `base` is an agent."""
    if not path.startswith("/v1/nodes"):
        return None
    node_id = agent_at(base, key)
    if node_id is None:
        return None
    return (f"{base} is a RoleMesh node agent (node {node_id!r}), not a dispatcher: point "
            f"--url or $ROLEMESH_URL at the dispatcher; this agent's own view is "
            f"{base.rstrip('/')}/v1/node/inventory")
