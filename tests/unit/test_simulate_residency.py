"""The node agent's residency planner (issue 8) inside the simulation, through its adapter.

Skipped until `rolemesh.planner` and a decision over resident sets are on this branch.
"""

from __future__ import annotations

import pytest

from rolemesh.simulate.engine import simulate
from rolemesh.simulate.report import summarize
from rolemesh.simulate.routers import RoleMesh
from tests.unit.test_simulate_world import cluster, trace


def test_rolemesh_runs_the_agents_residency_planner():
    assert RoleMesh(cluster()).agent_rules == "rolemesh.planner"


def test_alternating_two_models_that_fit_together_loads_each_once():
    run = simulate(cluster(mem=5000), "rolemesh",
                   trace((0.0, "ra"), (20.0, "rb"), (40.0, "ra"), (60.0, "rb")))
    assert summarize(run).loads == 2
    assert [r.outcome for r in run.requests] == ["ok"] * 4
    assert run.requests[2].latency_s == pytest.approx(6.0)  # a resident: no load


def test_a_model_that_does_not_fit_beside_evicts_the_idle_one():
    run = simulate(cluster(mem=10000), "rolemesh", trace((0.0, "ra"), (20.0, "rb")))
    assert run.requests[1].latency_s == pytest.approx(16.0)  # load 10 + 6 of work
    assert run.devices[("n", "gpu:0")].stops == {"evicted_for": 1}
