"""The real llama-server's answers carry `timings`, and the agent's metrics read them."""

from __future__ import annotations

import json
import urllib.request

import pytest

from node_agent.metrics import parse_timings
from tests.cluster.harness import TOKEN, model_entry, start_cluster

pytestmark = pytest.mark.real
MSG = [{"role": "user", "content": "hello"}]


def test_real_answers_and_streams_carry_timings_that_parse(tmp_path, tiny_models,
                                                           llama_server_bin):
    agents = {"host-a": [model_entry("letters", tiny_models["letters"], ["chat"],
                                     ctx_size=256, threads=1)]}
    with start_cluster(tmp_path, llama_server_bin, agents,
                       agent_extra={"llama_server_startup_timeout_s": 60}) as cluster:
        raw = cluster.client().chat.completions.with_raw_response.create(
            model="chat", messages=MSG, max_tokens=6)
        found = parse_timings(raw.content)
        assert found is not None, json.loads(raw.content).keys()
        prompt_ms, tps = found
        assert prompt_ms is not None
        assert tps is not None
        assert tps > 0
        agent = cluster.agents["host-a"]
        request = urllib.request.Request(agent.url + "/metrics",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            text = resp.read().decode()
        assert 'rolemesh_agent_tokens_per_second_count{model="letters"} 1.0' in text
        assert 'rolemesh_agent_llama_prompt_seconds_count{model="letters"} 1.0' in text
