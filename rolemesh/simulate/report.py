"""A run's figures, and the markdown table and JSON lines that show them.

Latency is from a request's first attempt to its last token, time to first token (TTFT)
from the first attempt to the first token; both over the requests that were answered.
`loads` counts every model load, `load_gpu_s` the device-seconds they took (a load cut
short counts what it took). `rejected`: a 503 after the client's retries; `timed_out`:
still waiting after the queue timeout; `unservable`: no device serves or fits the model.
`p95_all_s` is the p95 over every request, an unanswered one counting as never answered:
None (shown as ∞) when more than 5 % went unanswered. A policy cannot look fast by refusing.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from rolemesh.simulate.engine import RunResult


@dataclass(frozen=True)
class Summary:
    policy: str
    trace: str
    seed: int | None
    loads_kind: str
    requests: int
    ok: int
    rejected: int
    timed_out: int
    unservable: int
    loads: int
    load_gpu_s: float
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    p95_all_s: float | None  # unanswered requests count as infinitely slow
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    makespan_s: float


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(run: RunResult) -> Summary:
    reqs = run.requests
    latency = [r.latency_s for r in reqs if r.outcome == "ok" and r.latency_s is not None]
    ttft = [r.ttft_s for r in reqs if r.outcome == "ok" and r.ttft_s is not None]
    count = {k: sum(1 for r in reqs if r.outcome == k)
             for k in ("ok", "rejected", "timed_out")}
    stats = run.devices.values()
    return Summary(
        policy=run.policy, trace=run.trace, seed=run.seed, loads_kind=run.loads,
        requests=len(reqs), ok=count["ok"], rejected=count["rejected"],
        timed_out=count["timed_out"],
        unservable=sum(1 for r in reqs if r.outcome in ("fits_nowhere", "not_served")),
        loads=sum(s.loads for s in stats), load_gpu_s=round(sum(s.load_s for s in stats), 3),
        p50_s=_r(percentile(latency, 50)), p95_s=_r(percentile(latency, 95)),
        p99_s=_r(percentile(latency, 99)),
        p95_all_s=_r(_finite(percentile(latency + [math.inf] * (len(reqs) - len(latency)),
                                        95))),
        ttft_p50_s=_r(percentile(ttft, 50)),
        ttft_p95_s=_r(percentile(ttft, 95)), ttft_p99_s=_r(percentile(ttft, 99)),
        makespan_s=round(run.end_s, 3))


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) or math.isnan(value) else value


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def json_lines(summaries: Iterable[Summary]) -> str:
    return "".join(json.dumps(asdict(s)) + "\n" for s in summaries)


_COLUMNS = ("loads", "load_gpu_s", "p50_s", "p95_s", "p99_s", "ttft_p50_s", "ttft_p95_s",
            "ttft_p99_s", "rejected", "timed_out", "p95_all_s")
_HEADERS = ("loads", "load GPU-s", "p50 s", "p95 s", "p99 s", "TTFT p50", "TTFT p95",
            "TTFT p99", "rejected", "timed out", "p95 all s")


def _fmt(values: list[float | None], missing: float | None = None) -> str:
    """One figure, or `median (min-max)` over seeds; `missing` stands for a None."""
    present = [v for v in (missing if v is None else v for v in values) if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return _num(present[0])
    lo, hi = min(present), max(present)
    if lo == hi:
        return _num(lo)
    return f"{_num(statistics.median(present))} ({_num(lo)}-{_num(hi)})"


def _num(v: float) -> str:
    if math.isinf(v):
        return "∞"
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def markdown_table(summaries: Sequence[Summary]) -> str:
    """One row per (trace, policy); over several seeds: median (min-max)."""
    groups: dict[tuple[str, str, str], list[Summary]] = {}
    for s in summaries:
        groups.setdefault((s.trace, s.loads_kind, s.policy), []).append(s)
    head = ["trace", "policy", "requests", *_HEADERS]
    rows = [head, ["---"] * len(head)]
    for (trace, kind, policy), runs in groups.items():
        label = f"{trace} ({kind})"
        rows.append([label, policy, _fmt([s.requests for s in runs]),
                     *[_fmt([getattr(s, c) for s in runs],
                            math.inf if c == "p95_all_s" else None) for c in _COLUMNS]])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def ratio_table(summaries: Sequence[Summary], baselines: Sequence[str] = ("llama-swap",
                                                                           "floor"),
                policy: str = "rolemesh") -> str:
    """`policy`'s loads and p95s as ratios against each baseline, per trace (medians over
    seeds), and the requests each left unanswered (rejected + timed out)."""
    by: dict[tuple[str, str], dict[str, list[Summary]]] = {}
    for s in summaries:
        by.setdefault((s.trace, s.loads_kind), {}).setdefault(s.policy, []).append(s)
    head = ["trace", *[f"{m} vs {b}" for b in baselines
                       for m in ("loads", "p95", "TTFT p95", "p95 all", "unanswered")]]
    rows = [head, ["---"] * len(head)]
    for (trace, kind), pols in by.items():
        mine = pols.get(policy)
        if not mine:
            continue
        row = [f"{trace} ({kind})"]
        for b in baselines:
            theirs = pols.get(b, [])
            for field in ("loads", "p95_s", "ttft_p95_s", "p95_all_s"):
                row.append(_ratio(_median(mine, field), _median(theirs, field)))
            row.append(f"{_num(_median_unanswered(mine))} vs "
                       f"{_num(_median_unanswered(theirs)) if theirs else '-'}")
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _median(runs: Sequence[Summary], field: str) -> float | None:
    if field == "p95_all_s":  # None there is "never": it counts, as infinity
        values = [math.inf if s.p95_all_s is None else s.p95_all_s for s in runs]
    else:
        values = [getattr(s, field) for s in runs if getattr(s, field) is not None]
    return statistics.median(values) if values else None


def _median_unanswered(runs: Sequence[Summary]) -> float:
    return statistics.median([s.rejected + s.timed_out for s in runs]) if runs else 0.0


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if math.isinf(a) or math.isinf(b):
        return "=" if a == b else f"{_num(a)} vs {_num(b)}"
    if b == 0:
        return "=" if a == 0 else f"{_num(a)} vs 0"
    return f"{a / b:.2f}x"
