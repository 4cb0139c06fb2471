"""Figures, tables and the one JSON line every benchmark prints.

Every benchmark prints a human table and then exactly one line that starts with
`BENCH_JSON ` followed by a JSON object, so runs can be collected and compared by a script.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

JSON_PREFIX = "BENCH_JSON "


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ratio(value: float, baseline: float) -> float:
    if not baseline or math.isnan(baseline) or math.isnan(value):
        return math.nan
    return value / baseline


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    cells = [[fmt(c, digits) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    def line(items: Sequence[str]) -> str:
        return "  ".join(item.rjust(w) if i else item.ljust(w)
                         for i, (item, w) in enumerate(zip(items, widths, strict=True)))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                   time.gmtime())}


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def emit_json(benchmark: str, data: dict[str, Any]) -> None:
    payload = {"benchmark": benchmark, "machine": machine(), **data}
    print(JSON_PREFIX + json.dumps(_clean(payload), sort_keys=True), flush=True)


def say(*parts: object) -> None:
    """Progress notes go to stderr, so stdout holds only the tables and the JSON line."""
    print(*parts, file=sys.stderr, flush=True)


def goal(name: str, met: bool | None, measured: str, why: str = "") -> dict[str, Any]:
    return {"goal": name, "met": met, "measured": measured, "why": why}


def goals_table(goals: Sequence[dict[str, Any]]) -> str:
    rows = [[g["goal"], {True: "met", False: "NOT met", None: "n/a"}[g["met"]], g["measured"],
             g["why"]] for g in goals]
    return table(["goal", "verdict", "measured", "note"], rows)
