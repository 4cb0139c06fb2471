"""A model instance's lifecycle as data: which state may follow which."""

from __future__ import annotations

from rolemesh.api import InstanceState

S = InstanceState

# An instance lives once: empty -> starting -> ready [-> draining] -> stopping -> empty.
# A restart is a new instance (its owner carries the restart count over).
ALLOWED_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.EMPTY: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.DRAINING, S.STOPPING, S.FAILED}),
    # Draining ends in a stop, back in ready (nobody needs it gone any more), or in failed
    # (the process died while its last requests ran).
    S.DRAINING: frozenset({S.STOPPING, S.READY, S.FAILED}),
    S.STOPPING: frozenset({S.EMPTY}),
    S.FAILED: frozenset({S.EMPTY}),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: InstanceState, new: InstanceState) -> None:
    if new not in ALLOWED_TRANSITIONS[old]:
        raise IllegalTransition(f"instance cannot go from {old.value} to {new.value}")
