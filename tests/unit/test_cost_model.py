"""The cost model's weights as an operator writes them: defaults, overrides, bad values."""

from __future__ import annotations

import pytest

from dispatcher.config import DispatcherConfig
from node_agent.config import NodeAgentConfig
from rolemesh.cost_model import CostModel
from rolemesh.decision import Policy
from rolemesh.simulate.cluster import ClusterFile


def test_the_defaults_are_the_decisions_own():
    policy = CostModel().policy(memory_safety_margin=0.9)
    assert policy == Policy()


def test_every_weight_reaches_the_policy():
    weights = {"default_service_s": 3.0, "load_weight": 1.5, "regret_horizon_s": 60.0,
               "copy_regret_weight": 5.0, "idle_load_weight": 1.0}
    policy = CostModel(**weights).policy(memory_safety_margin=0.8, busy_retry_after_s=2.0)
    assert {k: getattr(policy, k) for k in weights} == weights
    assert (policy.memory_safety_margin, policy.busy_retry_after_s) == (0.8, 2.0)


@pytest.mark.parametrize(("settings", "expected"), [
    ([], CostModel()),
    (["load_weight=2"], CostModel(load_weight=2)),
    ([" copy_regret_weight = 8 ", "regret_horizon_s=300"],
     CostModel(copy_regret_weight=8, regret_horizon_s=300)),
    (["load_weight=2", "load_weight=3"], CostModel(load_weight=3)),  # the last one wins
    (["idle_load_weight=1"], CostModel(idle_load_weight=1)),
])
def test_settings_override_the_weights(settings, expected):
    assert CostModel().overridden(settings) == expected


@pytest.mark.parametrize(("setting", "message"), [
    ("load_weight", "expected NAME=VALUE"),
    ("copy_weight=2", "NAME one of default_service_s, load_weight"),
    ("load_weight=-1", "load_weight: Input should be greater than or equal to 0"),
    ("regret_horizon_s=0", "regret_horizon_s: Input should be greater than 0"),
    ("idle_load_weight=-0.5", "idle_load_weight: Input should be greater than or equal to 0"),
    ("default_service_s=fast", "default_service_s: Input should be a valid number"),
])
def test_a_bad_setting_says_which_and_why(setting, message):
    with pytest.raises(ValueError, match=message):
        CostModel().overridden([setting])


def test_the_dispatcher_the_agent_and_the_simulator_read_the_same_section():
    section = {"cost_model": {"load_weight": 2, "copy_regret_weight": 6}}
    expected = CostModel(load_weight=2, copy_regret_weight=6)
    assert DispatcherConfig.model_validate(section).cost_model == expected
    agent = NodeAgentConfig.model_validate({"node_id": "a", **section})
    assert agent.cost_model == expected
    cluster = ClusterFile.model_validate({
        "models": [{"model_id": "m", "size_gb": 1.0}],
        "nodes": [{"node_id": "a", "devices": [{"device_id": "gpu:0", "memory_mb": 8000}]}],
        "dispatcher": section})
    assert cluster.dispatcher.cost_model == expected


def test_an_unknown_weight_in_a_config_is_refused():
    with pytest.raises(ValueError, match="copy_weight"):
        DispatcherConfig.model_validate({"cost_model": {"copy_weight": 2}})
