"""The device slot's state machine as data: which state may follow which."""

from __future__ import annotations

from rolemesh.api import SlotState

S = SlotState

ALLOWED_TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    S.EMPTY: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.DRAINING, S.STOPPING, S.FAILED}),
    # Draining ends in a stop (switch or shutdown), back in ready (nobody wants the switch
    # any more), or in failed (the process died while its last requests ran).
    S.DRAINING: frozenset({S.STOPPING, S.READY, S.FAILED}),
    S.STOPPING: frozenset({S.STARTING, S.EMPTY}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING, S.EMPTY}),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: SlotState, new: SlotState) -> None:
    if new not in ALLOWED_TRANSITIONS[old]:
        raise IllegalTransition(f"slot cannot go from {old.value} to {new.value}")
