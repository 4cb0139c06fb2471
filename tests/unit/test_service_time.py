"""The service meter: a device's time split among the requests running on it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rolemesh.service_time import ServiceMeter, service_s


def test_before_any_request_ends_there_is_no_figure():
    meter = ServiceMeter()
    meter.started(1, "big", 0.0)
    assert service_s([meter], "big") is None


@pytest.mark.parametrize(("runs", "expected"), [
    # (request, model, start, end) -> mean device seconds per model
    ([(1, "big", 0.0, 26.0)], {"big": 26.0}),
    # one after another: each its own duration
    ([(1, "big", 0.0, 20.0), (2, "big", 20.0, 30.0)], {"big": 15.0}),
    # side by side the whole time: 40 s of the device shared by two, 20 s each
    ([(1, "big", 0.0, 40.0), (2, "big", 0.0, 40.0)], {"big": 20.0}),
    # overlapping: 1 alone 0-10, both 10-20 (5 s each), 2 alone 20-30
    ([(1, "big", 0.0, 20.0), (2, "big", 10.0, 30.0)], {"big": 15.0}),
    # a small model beside a big one: each is charged its own share, not the other's work
    ([(1, "big", 0.0, 30.0), (2, "small", 0.0, 4.0)], {"big": 28.0, "small": 2.0}),
])
def test_each_request_is_charged_its_share_of_the_device(runs, expected):
    meter = ServiceMeter()
    events = sorted([(start, 1, rid, model) for rid, model, start, _ in runs]
                    + [(end, 0, rid, model) for rid, model, _, end in runs])
    for t, starting, rid, model in events:
        if starting:
            meter.started(rid, model, t)
        else:
            meter.finished(rid, t)
    assert {m: service_s([meter], m) for m in expected} == pytest.approx(expected)


def test_the_figure_follows_the_last_requests_and_a_node_averages_its_devices():
    a, b = ServiceMeter(window=2), ServiceMeter(window=2)
    for rid, (start, end) in enumerate([(0, 100), (100, 110), (110, 120)]):
        a.started(rid, "m", start)
        a.finished(rid, end)
    assert service_s([a], "m") == pytest.approx(10.0)  # the 100 s one has left the window
    b.started("x", "m", 0.0)
    b.finished("x", 40.0)
    assert service_s([a, b], "m") == pytest.approx(20.0)  # (10 + 10 + 40) / 3


def test_an_unknown_request_ending_changes_nothing():
    meter = ServiceMeter()
    meter.finished("never-started", 5.0)
    assert meter.samples("m") == ()


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0.01, 50), st.sampled_from("ab")),
                min_size=1, max_size=12))
def test_the_shares_add_up_to_the_time_the_device_was_busy(jobs):
    meter = ServiceMeter(window=100)
    events = sorted([(s, 1, i, m) for i, (s, _, m) in enumerate(jobs)]
                    + [(s + d, 0, i, m) for i, (s, d, m) in enumerate(jobs)])
    for t, starting, rid, model in events:
        if starting:
            meter.started(rid, model, t)
        else:
            meter.finished(rid, t)
    intervals = sorted((s, s + d) for s, d, _ in jobs)
    busy, end = 0.0, -1.0
    for s, e in intervals:  # the union of the requests' runs
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    total = sum(meter.samples("a")) + sum(meter.samples("b"))
    assert total == pytest.approx(busy, rel=1e-6, abs=1e-6)
    assert len(meter.samples("a")) + len(meter.samples("b")) == len(jobs)
