"""The simulator's world model on scenarios whose times are computed by hand.

The model `a` (and `b`): load 10 s, prompt 1000 tokens at 1000 tok/s (1 s to the first
token), answers of exactly 50 tokens at 10 tok/s (5 s more): 6 s of work alone.
"""

from __future__ import annotations

import pytest

from rolemesh.simulate.cluster import load_cluster
from rolemesh.simulate.engine import simulate
from rolemesh.simulate.report import summarize
from rolemesh.simulate.trace import Arrival, Call, Session, Trace

MODEL = """
  - model_id: {id}
    roles: [{role}]
    size_gb: 1
    memory_need_mb: {mem}
    load_s: 10
    parallel: {parallel}
    prefill_tokens_per_s: 1000
    prompt_tokens: 1000
    tokens_per_s: 10
    output_tokens: {{mean: 50, sigma: 0}}
"""


def cluster(parallel: int = 1, devices: int = 1, mem: int = 10000, retries: int = 0,
            pending_limit: int = 2, switch_wait_s: float = 30.0, buffered: int = 0,
            buffer_timeout_s: float = 300.0):
    # buffered: the dispatcher's max_buffered_requests (0 here: a 503 at once, so the
    # hand-computed retries below stay simple; the cluster file's default buffers).
    models = MODEL.format(id="a", role="ra", mem=mem, parallel=parallel) + \
        MODEL.format(id="b", role="rb", mem=mem, parallel=parallel)
    devs = ", ".join(f'{{device_id: "gpu:{i}", memory_mb: 12000}}' for i in range(devices))
    text = (f"client: {{retries: {retries}}}\n"
            f"agent: {{pending_limit: {pending_limit}, max_switch_wait_s: {switch_wait_s}}}\n"
            f"dispatcher: {{max_buffered_requests: {buffered}, "
            f"buffer_timeout_s: {buffer_timeout_s}}}\n"
            f"models:{models}nodes:\n  - node_id: n\n    devices: [{devs}]\n")
    return load_cluster(text)


def trace(*arrivals: tuple[float, str]) -> Trace:
    return Trace("hand", tuple(Arrival(t, Call(name, 0.5)) for t, name in arrivals))


def times(run):
    return [(r.outcome, r.ttft_s, r.latency_s) for r in run.requests]


@pytest.mark.parametrize("policy", ["rolemesh", "llama-swap", "ollama", "least-loaded",
                                    "round-robin"])
def test_one_request_waits_for_one_load_then_prefill_then_decode(policy):
    run = simulate(cluster(), policy, trace((0.0, "ra")))
    assert times(run) == [("ok", pytest.approx(11.0), pytest.approx(16.0))]
    s = summarize(run)
    assert (s.loads, s.load_gpu_s) == (1, 10.0)


def test_the_floor_never_loads():
    run = simulate(cluster(), "floor", trace((0.0, "ra"), (0.0, "rb")))
    assert summarize(run).loads == 0
    # Both resident on the one device: they share it, 12 s of work in 12 s, first tokens
    # after 2 s each (1 s of prefill at half speed).
    assert times(run) == [("ok", pytest.approx(2.0), pytest.approx(12.0))] * 2


def test_a_second_request_for_the_loaded_model_loads_nothing():
    run = simulate(cluster(), "rolemesh", trace((0.0, "ra"), (20.0, "ra")))
    assert times(run)[1] == ("ok", pytest.approx(1.0), pytest.approx(6.0))
    assert summarize(run).loads == 1


def test_a_switch_waits_for_the_loaded_model_then_loads_the_other():
    # b arrives at 1 s while a loads (ready 10, done 16); the device switches at 16:
    # b ready at 26, first token 27, done 32.
    run = simulate(cluster(), "rolemesh", trace((0.0, "ra"), (1.0, "rb")))
    assert times(run) == [("ok", pytest.approx(11.0), pytest.approx(16.0)),
                          ("ok", pytest.approx(26.0), pytest.approx(31.0))]
    s = summarize(run)
    assert (s.loads, s.load_gpu_s) == (2, 20.0)
    assert sum(run.devices[("n", "gpu:0")].stops.values()) == 1


def test_a_queue_on_one_slot_serves_in_turn():
    run = simulate(cluster(), "rolemesh", trace((0.0, "ra"), (0.0, "ra")))
    assert times(run) == [("ok", pytest.approx(11.0), pytest.approx(16.0)),
                          ("ok", pytest.approx(17.0), pytest.approx(22.0))]


def test_two_parallel_slots_share_the_device():
    # Both start at 10 at half speed: first tokens after 2 s, both done after 12 s.
    run = simulate(cluster(parallel=2), "rolemesh", trace((0.0, "ra"), (0.0, "ra")))
    assert times(run) == [("ok", pytest.approx(12.0), pytest.approx(22.0))] * 2


def test_beyond_the_pending_limit_a_request_is_rejected_without_retries():
    run = simulate(cluster(), "rolemesh", trace((0.0, "ra"), (0.0, "ra"), (0.0, "ra")))
    assert [r.outcome for r in run.requests] == ["ok", "ok", "rejected"]


def test_a_rejected_request_retries_after_retry_after_and_counts_from_its_first_try():
    # The third request is refused at 0, 1 and 2 s... until the first finishes at 16 s:
    # with 20 retries it gets in at 16 (its 16th retry), runs after the second (22 s).
    run = simulate(cluster(retries=20), "rolemesh",
                   trace((0.0, "ra"), (0.0, "ra"), (0.0, "ra")))
    third = run.requests[2]
    assert (third.outcome, third.tries) == ("ok", 16)
    assert third.latency_s == pytest.approx(28.0)


def test_beyond_the_pending_limit_the_dispatcher_holds_a_request_until_a_device_frees():
    # The third is held at the dispatcher (no 503, no retry) and placed when the first
    # finishes at 16 s; it runs after the second: done at 28 s, as with the retries above.
    run = simulate(cluster(buffered=512), "rolemesh",
                   trace((0.0, "ra"), (0.0, "ra"), (0.0, "ra")))
    third = run.requests[2]
    assert (third.outcome, third.tries) == ("ok", 0)
    assert third.latency_s == pytest.approx(28.0)


def test_a_request_held_past_the_buffer_timeout_times_out_and_one_past_the_count_is_rejected():
    run = simulate(cluster(buffered=1, buffer_timeout_s=5.0), "rolemesh",
                   trace((0.0, "ra"), (0.0, "ra"), (0.0, "ra"), (0.0, "ra")))
    assert [r.outcome for r in run.requests] == ["ok", "ok", "timed_out", "rejected"]


def test_the_patience_bound_forces_a_switch_away_from_a_busy_model():
    # a keeps one request in flight all the time (a closed loop with no think time);
    # b waits from 1 s; its patience (max(switch wait 5 s, no load seen yet)) counts from
    # when a became ready (10 s): due at 15 s, and the switch happens once a's running
    # request is done, at 16 s: b is answered at 16 + 10 + 6 = 32 s.
    loop = Session(0.0, tuple(Call("ra", 0.5) for _ in range(6)), (0.0,) * 6)
    t = Trace("hand", (Arrival(1.0, Call("rb", 0.5)),), (loop,))
    run = simulate(cluster(switch_wait_s=5.0), "rolemesh", t)
    b = next(r for r in run.requests if r.call.name == "rb")
    assert b.done_t == pytest.approx(32.0)


def test_a_second_device_takes_the_other_model_at_once():
    run = simulate(cluster(devices=2), "rolemesh", trace((0.0, "ra"), (1.0, "rb")))
    assert times(run)[1] == ("ok", pytest.approx(11.0), pytest.approx(16.0))
    assert {r.key for r in run.requests} == {("n", "gpu:0"), ("n", "gpu:1")}


def test_models_that_fit_together_stay_side_by_side_under_the_operator_map():
    run = simulate(cluster(mem=5000), "llama-swap",
                   trace((0.0, "ra"), (20.0, "rb"), (40.0, "ra"), (60.0, "rb")))
    assert summarize(run).loads == 2


def test_a_policy_that_refuses_work_has_no_finite_p95_over_all_requests():
    run = simulate(cluster(), "rolemesh", trace((0.0, "ra"), (0.0, "ra"), (0.0, "ra")))
    s = summarize(run)
    assert s.p95_s == pytest.approx(21.7)  # the two answered: 16 and 22 s
    assert s.p95_all_s is None  # one in three never answered
