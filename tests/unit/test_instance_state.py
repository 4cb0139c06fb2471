"""The instance state machine's table: what may follow what."""

from __future__ import annotations

import itertools

import pytest

from node_agent.instance_state import ALLOWED_TRANSITIONS, IllegalTransition, check_transition
from rolemesh.api import InstanceState as S

LIFECYCLES = {
    "start": [S.EMPTY, S.STARTING, S.READY],
    "evicted": [S.READY, S.STOPPING, S.EMPTY],
    "evicted after draining its requests": [S.READY, S.DRAINING, S.STOPPING, S.EMPTY],
    "crash while serving": [S.READY, S.FAILED, S.EMPTY],
    "crash while draining": [S.DRAINING, S.FAILED, S.EMPTY],
    "a drain nobody needs any more": [S.READY, S.DRAINING, S.READY],
    "failed start": [S.STARTING, S.FAILED, S.EMPTY],
    "stopped while starting": [S.STARTING, S.STOPPING, S.EMPTY],
}


@pytest.mark.parametrize("steps", LIFECYCLES.values(), ids=LIFECYCLES.keys())
def test_every_lifecycle_an_instance_goes_through_is_allowed(steps):
    for old, new in itertools.pairwise(steps):
        check_transition(old, new)


@pytest.mark.parametrize(("old", "new"), [
    (S.EMPTY, S.READY), (S.EMPTY, S.DRAINING), (S.STARTING, S.DRAINING),
    (S.READY, S.STARTING), (S.READY, S.EMPTY), (S.STOPPING, S.READY),
    (S.STOPPING, S.STARTING), (S.FAILED, S.READY), (S.FAILED, S.STARTING),
    (S.DRAINING, S.STARTING),
])
def test_shortcuts_are_refused(old, new):
    with pytest.raises(IllegalTransition, match=f"from {old.value} to {new.value}"):
        check_transition(old, new)


def test_the_table_covers_every_state_and_no_state_loops_to_itself():
    assert set(ALLOWED_TRANSITIONS) == set(S)
    for state, nexts in ALLOWED_TRANSITIONS.items():
        assert state not in nexts
