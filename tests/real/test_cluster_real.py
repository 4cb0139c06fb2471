"""Dispatcher + two agents, each with the real llama-server and its own tiny model."""

from __future__ import annotations

import re

import pytest

from tests.cluster.harness import model_entry, start_cluster
from tests.processes import llama_server_pids
from tests.waiting import wait_until_sync

pytestmark = pytest.mark.real
MSG = [{"role": "user", "content": "hello"}]


def test_role_labelled_requests_reach_the_right_real_model_on_the_right_node(
        tmp_path, tiny_models, llama_server_bin):
    agents = {
        "host-a": [model_entry("letters", tiny_models["letters"], ["planner"],
                               ctx_size=256, threads=1)],
        "host-b": [model_entry("digits", tiny_models["digits"], ["coder"],
                               ctx_size=256, threads=1)],
    }
    with start_cluster(tmp_path, llama_server_bin, agents,
                       agent_extra={"llama_server_startup_timeout_s": 60}) as cluster:
        client = cluster.client()
        planned = client.chat.completions.with_raw_response.create(
            model="planner", messages=MSG, max_tokens=12)
        assert planned.headers["x-rolemesh-node"] == "host-a"
        assert re.fullmatch(r"[a-z\s]+", planned.parse().choices[0].message.content or "")

        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="coder", messages=MSG, max_tokens=12, stream=True) if c.choices]
        assert len([p for p in pieces if p]) > 1
        assert re.fullmatch(r"[0-9\s]+", "".join(pieces))

        nodes = cluster.nodes()
        assert [i["model_id"] for i in nodes["host-a"]["devices"][0]["status"]["instances"]] \
            == ["letters"]
        assert [i["model_id"] for i in nodes["host-b"]["devices"][0]["status"]["instances"]] \
            == ["digits"]
        listed = {m.id for m in client.models.list().data}
        assert {"planner", "coder", "letters", "digits"} <= listed
        children = set().union(*(llama_server_pids(under=a.proc.pid)
                                 for a in cluster.agents.values()))
        assert len(children) == 2
    wait_until_sync(lambda: not (llama_server_pids() & children), timeout_s=10,
                    what="no llama-server left")
