"""A Decision as JSON for `/v1/route` and logs: the winner and every candidate's verdict."""

from __future__ import annotations

from typing import Any

from rolemesh.decision import Decision, Verdict


def render_verdict(v: Verdict) -> dict[str, Any]:
    return {
        "node_id": v.node_id, "device_id": v.device_id, "model_id": v.model_id,
        "chosen": v.chosen, "reason": v.reason.value, "queue": v.queue,
        "memory_need_mb": v.memory_need_mb, "memory_total_mb": v.memory_total_mb,
        "memory_free_mb": v.memory_free_mb, "eviction_cost": v.eviction_cost,
        "evicts": list(v.evicts), "recently_failed": v.recently_failed,
        "busy_neighbours": v.busy_neighbours, "note": v.note,
        # The cost model: expected seconds to serve it here, and its parts.
        "expected_s": _s(v.expected_s), "wait_s": _s(v.wait_s), "load_s": _s(v.load_s),
        "regret_s": _s(v.regret_s), "would": v.would.value if v.would else None,
    }


def _s(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def render_decision(decision: Decision) -> dict[str, Any]:
    return {
        "outcome": decision.outcome.value,
        "models": list(decision.model_ids),
        "action": decision.action.value if decision.action else None,
        "winner": render_verdict(decision.winner) if decision.winner else None,
        "explanation": decision.explain(),
        "retry_after_s": decision.retry_after_s,
        "waits_for": render_verdict(decision.waits_for) if decision.waits_for else None,
        "candidates": [render_verdict(v) for v in decision.verdicts],
    }
