"""Every endpoint of the real llama-server in use, through the dispatcher and a real agent.

The build in use serves /v1/rerank, /infill, /v1/messages, /v1/responses, /tokenize and
/detokenize (docs/api.md). Each is asked for by role; the answer comes from the model that
carries it and names that model. Tiny test models have no fill-in-the-middle tokens, so
llama-server answers /infill with 501, which the agent turns into the 400 `not_supported`
it is for a client (a retry cannot help), keeping llama-server's message.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.cluster.harness import TOKEN, model_entry, start_cluster

pytestmark = pytest.mark.real
MSG = [{"role": "user", "content": "hello"}]
CASES: list[tuple[str, str, dict[str, Any], int]] = [
    ("/v1/chat/completions", "chat", {"messages": MSG, "max_tokens": 3}, 200),
    ("/v1/completions", "chat", {"prompt": "hello", "max_tokens": 3}, 200),
    ("/v1/messages", "chat", {"messages": MSG, "max_tokens": 3}, 200),
    ("/v1/responses", "chat", {"input": "hello", "max_output_tokens": 3}, 200),
    ("/tokenize", "chat", {"content": "hi"}, 200),
    ("/detokenize", "chat", {"tokens": [104, 105]}, 200),
    ("/infill", "chat", {"input_prefix": "ab", "input_suffix": "cd"}, 400),
    ("/v1/rerank", "reranker", {"query": "a", "documents": ["b", "c"]}, 200),
]


async def test_every_endpoint_of_the_real_llama_server_answers_through_the_dispatcher(
        tmp_path, tiny_models, llama_server_bin):
    agents = {
        "host-a": [model_entry("letters", tiny_models["letters"], ["chat"], ctx_size=256,
                               threads=1)],
        "host-b": [model_entry("digits", tiny_models["digits"], ["reranker"], ctx_size=256,
                               threads=1, server_args={"--reranking": True})],
    }
    with start_cluster(tmp_path, llama_server_bin, agents,
                       agent_extra={"llama_server_startup_timeout_s": 60}) as cluster:
        url = cluster.dispatcher.url
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
            for path, role, body, status in CASES:
                async with s.post(url + path, json={"model": role, **body}) as resp:
                    answer = await resp.json()
                    assert resp.status == status, (path, answer)
                    assert resp.headers["X-RoleMesh-Target"] == role
                expected = "letters" if role == "chat" else "digits"
                assert resp.headers["X-RoleMesh-Node"] == \
                    ("host-a" if expected == "letters" else "host-b")
                if status != 200:
                    assert answer["error"]["code"] == "not_supported", answer
                    assert "infill" in answer["error"]["message"].lower(), answer
                elif path == "/tokenize":
                    assert answer["tokens"] == [104, 105]  # the byte-level tiny vocab
                elif path == "/detokenize":
                    assert answer["content"] == "hi"
                elif path == "/v1/rerank":
                    assert sorted(r["index"] for r in answer["results"]) == [0, 1]
                else:  # the answer names the model that answered, not the role asked
                    assert answer["model"] == expected, (path, answer)
