"""The residency keys of the node agent's config: each validated, each with a clear error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from node_agent.config import NodeAgentConfig


def config(**model: object) -> NodeAgentConfig:
    return NodeAgentConfig.model_validate({"models": [{"model_id": "m", "path": "m.gguf",
                                                       **model}]})


@pytest.mark.parametrize(("model", "message"), [
    ({"ttl_s": 0}, "ttl_s must be > 0 seconds, or 'never'"),
    ({"ttl_s": "soon"}, "ttl_s"),
    ({"devices": []}, "name at least one device"),
    ({"devices": ["gpu:0", "gpu:0"]}, "a device appears twice"),
    ({"devices": ["gpu:0", "cpu"]}, "'cpu' cannot be in one"),
    ({"devices": ["tpu:0"]}, "is not 'cpu' or 'gpu:N'"),
    ({"devices": ["gpu:0", "gpu:1"], "tensor_split": [1, 1, 1]}, "3 weights for 2 devices"),
    ({"pinned": True, "ttl_s": 60}, "a pinned model is never unloaded"),
    ({"memory_mb": 0}, "memory_mb"),
    ({"mmproj": "p.gguf", "parallel": 2}, "a vision model runs images one at a time"),
])
def test_a_bad_lifecycle_key_is_refused_with_what_is_wrong(model, message):
    with pytest.raises(ValidationError, match=message):
        config(**model)


def test_sets_must_name_models_of_this_node():
    with pytest.raises(ValidationError, match=r"sets.voice: ghost is not a model_id here"):
        NodeAgentConfig.model_validate({"models": [{"model_id": "m", "path": "m.gguf"}],
                                        "sets": {"voice": ["m", "ghost"]}})


def test_ttl_comes_from_the_model_then_the_agent_default_and_never_for_pinned():
    c = NodeAgentConfig.model_validate({"default_ttl_s": 300, "models": [
        {"model_id": "a", "path": "a.gguf", "ttl_s": 60},
        {"model_id": "b", "path": "b.gguf"},
        {"model_id": "c", "path": "c.gguf", "ttl_s": "never"},
        {"model_id": "d", "path": "d.gguf", "pinned": True}]})
    assert [c.ttl_of(m) for m in c.models] == [60.0, 300.0, None, None]
