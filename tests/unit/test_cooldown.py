"""Cool-downs and suspect nodes: pure records on a clock passed in."""

from __future__ import annotations

import pytest

from dispatcher.cooldown import (
    Avoidance,
    CooldownPolicy,
    DeviceHealth,
    after_failure,
    cooling_left_s,
)

POLICY = CooldownPolicy(after_failures=3, first_s=5.0, max_s=40.0)
KEY = ("node-a", "gpu:0")


def fail_times(n: int, now: float = 0.0) -> DeviceHealth:
    health = DeviceHealth()
    for _ in range(n):
        health = after_failure(health, now, POLICY)
    return health


def test_two_failures_in_a_row_do_not_cool_a_device():
    assert cooling_left_s(fail_times(2), 0.0) == 0.0


def test_the_third_failure_in_a_row_cools_it_for_the_first_length():
    health = fail_times(3, now=100.0)
    assert health.until == 105.0
    assert cooling_left_s(health, 101.0) == 4.0


def test_failures_while_it_cools_do_not_double_it_again():
    health = fail_times(3, now=100.0)
    assert after_failure(health, 102.0, POLICY).until == 105.0


@pytest.mark.parametrize(("cooldowns", "length"), [(0, 5.0), (1, 10.0), (2, 20.0), (3, 40.0),
                                                    (4, 40.0), (9, 40.0)])
def test_each_failure_after_a_cool_down_cools_it_twice_as_long_up_to_the_cap(cooldowns, length):
    health = DeviceHealth(failures=3, cooldowns=cooldowns, until=50.0)
    after = after_failure(health, 60.0, POLICY) if cooldowns else fail_times(3, now=60.0)
    assert after.until - 60.0 == length


def test_a_success_forgets_the_failures():
    avoidance = Avoidance(POLICY)
    for _ in range(2):
        avoidance.failure(KEY, 0.0)
    avoidance.success(KEY)
    for _ in range(2):
        assert avoidance.failure(KEY, 1.0) is None
    assert avoidance.cooldowns(1.0) == {}


def test_avoidance_reports_cooling_devices_and_when_they_end():
    avoidance = Avoidance(POLICY)
    lengths = [avoidance.failure(KEY, 10.0) for _ in range(3)]
    assert lengths == [None, None, 5.0]
    assert avoidance.cooldowns(12.0) == {KEY: 3.0}
    assert avoidance.avoided(12.0, lambda n: None) == [KEY]
    assert avoidance.avoided(15.0, lambda n: None) == []  # over: routable again


def test_a_suspect_node_is_avoided_until_a_newer_heartbeat():
    avoidance = Avoidance(POLICY)
    nodes = {"node-b": (5.0, ("gpu:0", "gpu:1"))}
    avoidance.suspect("node-b", 7.0)
    assert avoidance.avoided(8.0, nodes.get) == [("node-b", "gpu:0"), ("node-b", "gpu:1")]
    assert avoidance.suspects(lambda n: nodes[n][0]) == ["node-b"]
    nodes["node-b"] = (9.0, ("gpu:0", "gpu:1"))  # it heartbeat after the suspicion
    assert avoidance.avoided(9.5, nodes.get) == []
    assert avoidance.suspects(lambda n: nodes[n][0]) == []


def test_a_suspect_node_that_is_forgotten_is_dropped():
    avoidance = Avoidance(POLICY)
    avoidance.suspect("node-b", 7.0)
    assert avoidance.avoided(8.0, lambda n: None) == []
    assert avoidance.suspects(lambda n: None) == []
