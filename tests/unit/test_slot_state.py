"""The slot state machine's table: what may follow what."""

from __future__ import annotations

import itertools

import pytest

from node_agent.slot_state import ALLOWED_TRANSITIONS, IllegalTransition, check_transition
from rolemesh.api import SlotState as S

LIFECYCLES = {
    "start": [S.EMPTY, S.STARTING, S.READY],
    "switch": [S.READY, S.DRAINING, S.STOPPING, S.STARTING, S.READY],
    "crash while serving, restart": [S.READY, S.FAILED, S.STARTING, S.READY],
    "crash while draining": [S.DRAINING, S.FAILED],
    "a switch nobody wants any more": [S.READY, S.DRAINING, S.READY],
    "failed start, retry": [S.STARTING, S.FAILED, S.STARTING],
    "shutdown when ready": [S.READY, S.STOPPING, S.EMPTY],
    "shutdown while starting": [S.STARTING, S.STOPPING, S.EMPTY],
    "shutdown after a failure": [S.FAILED, S.EMPTY],
}


@pytest.mark.parametrize("steps", LIFECYCLES.values(), ids=LIFECYCLES.keys())
def test_every_lifecycle_the_slot_goes_through_is_allowed(steps):
    for old, new in itertools.pairwise(steps):
        check_transition(old, new)


@pytest.mark.parametrize(("old", "new"), [
    (S.EMPTY, S.READY), (S.EMPTY, S.DRAINING), (S.STARTING, S.DRAINING),
    (S.READY, S.STARTING), (S.READY, S.EMPTY), (S.STOPPING, S.READY),
    (S.STOPPING, S.FAILED), (S.FAILED, S.READY), (S.DRAINING, S.STARTING),
])
def test_shortcuts_are_refused(old, new):
    with pytest.raises(IllegalTransition, match=f"from {old.value} to {new.value}"):
        check_transition(old, new)


def test_the_table_covers_every_state_and_no_state_loops_to_itself():
    assert set(ALLOWED_TRANSITIONS) == set(S)
    for state, nexts in ALLOWED_TRANSITIONS.items():
        assert state not in nexts
