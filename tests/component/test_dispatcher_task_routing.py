"""Routing by task and content, end to end: the openai SDK -> the dispatcher -> fake agents."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.fakes.fake_agent import (
    FakeAgent,
    FakeDevice,
    FakeModel,
    RunningDispatcher,
    dispatcher_config,
    running_agents,
    running_dispatcher,
)
from tests.waiting import wait_until

TOKEN = "tok-routing"
ADMIN = "adm-routing"
TABLE: dict[str, Any] = {
    "task_types": {"planning": "architect", "design": "architect", "implementation": "builder",
                   "infra": "operator", "email": "assistant"},
    "keyword_rules": [{"name": "kubernetes", "pattern": r"\b(kubectl|helm|k8s)\b",
                       "task_type": "infra"}],
    "content_rules": [
        {"name": "images", "when": {"images": True}, "role": "vision"},
        {"name": "realtime", "when": {"latency": "realtime"}, "role": "operator"},
        {"name": "long_prompt", "when": {"min_prompt_tokens": 2000}, "role": "architect"},
    ],
    "fallbacks": {"architect": ["builder"], "operator": ["builder"]},
}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def tiers() -> tuple[FakeAgent, FakeAgent]:
    big = FakeAgent("big", [FakeDevice("gpu:0", memory_total_mb=80000)], [
        FakeModel("qwen-72b", ["architect"], memory_need_mb=40000, ctx_size=32768),
        FakeModel("llava-7b", ["vision"], memory_need_mb=8000, ctx_size=4096)])
    small = FakeAgent("small", [FakeDevice("gpu:0", memory_total_mb=24000)], [
        FakeModel("coder-14b", ["builder"], memory_need_mb=12000, ctx_size=16384),
        FakeModel("qwen-3b", ["operator", "assistant"], memory_need_mb=3000, ctx_size=1024)])
    return big, small


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, table: dict[str, Any] | None = None,
                  agents: tuple[FakeAgent, ...] | None = None, **config: Any
                  ) -> AsyncIterator[tuple[RunningDispatcher, openai.AsyncOpenAI,
                                           aiohttp.ClientSession, tuple[FakeAgent, ...]]]:
    agents = agents or tiers()
    conf = dispatcher_config(routing=TABLE if table is None else table, cluster_token=TOKEN,
                             admin_keys=[ADMIN], routing_file=str(tmp_path / "t.json"),
                             **config)
    async with running_agents(*agents), running_dispatcher(conf) as d, \
            aiohttp.ClientSession() as s:
        for a in agents:
            await a.register(s, d.url, TOKEN)
        client = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="-", max_retries=0)
        try:
            yield d, client, s, agents
        finally:
            await client.close()


async def chat(client: openai.AsyncOpenAI, model: str, content: Any = "hi", **kw: Any):
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], **kw)
    return raw.headers, raw.parse()


def answered_by(answer: Any) -> str:
    return str(answer.choices[0].message.content).split("/")[-1]


async def test_an_image_message_reaches_the_vision_model(tmp_path):
    async with cluster(tmp_path) as (_, client, _, _):
        h, answer = await chat(client, "builder", [{"type": "text", "text": "what is it"},
                                                   IMAGE])
        assert answered_by(answer) == "llava-7b"
        assert answer.model == "llava-7b"  # the model that answered, not the name asked
        assert h["x-rolemesh-rule"] == "content:images"
        assert h["x-rolemesh-target"] == "vision"


async def test_a_task_type_header_reaches_its_tier_and_the_answer_says_so(tmp_path):
    async with cluster(tmp_path) as (_, client, _, _):
        h, answer = await chat(client, "auto", extra_headers={"X-RoleMesh-Task-Type": "infra"})
        assert answered_by(answer) == "qwen-3b"
        assert (h["x-rolemesh-task-type"], h["x-rolemesh-task-type-source"],
                h["x-rolemesh-rule"]) == ("infra", "header", "task_type:infra")
        _, answer = await chat(client, "auto", metadata={"task_type": "design"})
        assert answered_by(answer) == "qwen-72b"
        h, answer = await chat(client, "implementation")  # `model` is itself a task type
        assert (answered_by(answer), h["x-rolemesh-task-type-source"]) == ("coder-14b", "model")


async def test_a_keyword_rule_sends_kubernetes_work_to_the_operator_not_the_builder(tmp_path):
    async with cluster(tmp_path) as (_, client, _, _):
        h, answer = await chat(client, "builder", "kubectl rollout restart deploy/api please")
        assert answered_by(answer) == "qwen-3b"
        assert (h["x-rolemesh-task-type-source"], h["x-rolemesh-rule"]) == \
            ("keyword", "task_type:infra")
        _, answer = await chat(client, "builder", "write a parser")
        assert answered_by(answer) == "coder-14b"


async def test_an_override_wins_over_the_table_and_the_content_rules(tmp_path):
    async with cluster(tmp_path) as (_, client, _, _):
        h, answer = await chat(client, "builder", [IMAGE], extra_headers={
            "X-RoleMesh-Role": "architect", "X-RoleMesh-Task-Type": "email"})
        assert (answered_by(answer), h["x-rolemesh-rule"]) == ("qwen-72b", "override:header")
        h, answer = await chat(client, "coder-14b", "kubectl get pods",
                               extra_headers={"X-RoleMesh-Latency": "realtime"})
        assert (answered_by(answer), h["x-rolemesh-rule"]) == ("coder-14b", "override:model")


async def test_realtime_latency_goes_to_the_fast_tier(tmp_path):
    async with cluster(tmp_path) as (_, client, _, _):
        h, answer = await chat(client, "architect", extra_headers={
            "X-RoleMesh-Latency": "realtime"})
        assert (answered_by(answer), h["x-rolemesh-rule"]) == ("qwen-3b", "content:realtime")


async def test_a_long_prompt_reaches_the_large_model_or_a_fallback_with_room(tmp_path):
    async with cluster(tmp_path) as (_, client, _, _):
        _, answer = await chat(client, "assistant", "word " * 2000)  # ~2,500 tokens
        assert answered_by(answer) == "qwen-72b"
        # No long-prompt rule: the assistant's 1,024-token context is too small, its
        # fallback (the builder, 16k) has room.
        table = {**TABLE, "content_rules": [], "fallbacks": {"assistant": ["builder"]}}
    async with cluster(tmp_path, table) as (_, client, _, _):
        h, answer = await chat(client, "assistant", "word " * 2000)
        assert answered_by(answer) == "coder-14b"
        assert h["x-rolemesh-fallback"] == "assistant->builder (context_length)"
        with pytest.raises(openai.BadRequestError) as err:
            await chat(client, "assistant", "word " * 40000)  # ~50,000 tokens: none has room
        assert err.value.code == "context_length_exceeded"
        assert "about 50" in err.value.message
        assert "32768 tokens" in err.value.message
        with pytest.raises(openai.BadRequestError) as err:  # an override is not moved
            await chat(client, "qwen-3b", "word " * 2000)
        assert err.value.code == "context_length_exceeded"
        assert "1024 tokens" in err.value.message


async def test_a_busy_role_does_not_fall_back_to_a_model_too_small_for_the_prompt(tmp_path):
    big, small = tiers()
    table = {**TABLE, "content_rules": [], "fallbacks": {"builder": ["assistant"]}}
    async with cluster(tmp_path, table, agents=(big, small), max_attempts=1) as (
            _, client, _, _):
        small.knobs.busy = True  # the builder's device (and the assistant's) are busy
        with pytest.raises(openai.InternalServerError):
            await chat(client, "builder", "word " * 2000)  # 2,500 tokens: not the 1k assistant
        assert [s.body["model"] for s in small.seen] == ["coder-14b"]


async def test_a_role_that_fits_nowhere_falls_back(tmp_path):
    small = FakeAgent("small", [FakeDevice("gpu:0", memory_total_mb=24000)], [
        FakeModel("qwen-72b", ["architect"], memory_need_mb=40000),
        FakeModel("coder-14b", ["builder"], memory_need_mb=12000)])
    async with cluster(tmp_path, agents=(small,)) as (_, client, _, _):
        h, answer = await chat(client, "planning")
        assert answered_by(answer) == "coder-14b"
        assert h["x-rolemesh-fallback"] == "architect->builder (model_does_not_fit)"


async def test_every_device_busy_falls_back_to_the_fallback_role(tmp_path):
    big, small = tiers()
    async with cluster(tmp_path, agents=(big, small), max_attempts=1) as (_, client, _, _):
        big.knobs.busy = True
        h, answer = await chat(client, "architect")
        assert answered_by(answer) == "coder-14b"
        assert h["x-rolemesh-fallback"] == "architect->builder (device_busy)"
        small.knobs.busy = True  # the fallback busy too: the client gets the 503
        with pytest.raises(openai.InternalServerError) as err:
            await chat(client, "architect")
        assert err.value.status_code == 503


async def put(s: aiohttp.ClientSession, url: str, table: Any, key: str | None = ADMIN,
              if_match: str | None = None) -> tuple[int, dict[str, Any], str | None]:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    if if_match:
        h["If-Match"] = if_match
    async with s.put(url + "/v1/routing", json=table, headers=h) as resp:
        return resp.status, await resp.json(), resp.headers.get("ETag")


async def test_the_table_edited_through_the_api_takes_effect_at_once_and_survives_a_restart(
        tmp_path):
    big, small = tiers()
    async with cluster(tmp_path, agents=(big, small)) as (d, client, s, _):
        async with s.get(d.url + "/v1/routing") as resp:
            doc, etag = await resp.json(), resp.headers["ETag"]
        assert (doc["version"], doc["source"], etag) == (1, "config", '"1"')
        _, answer = await chat(client, "auto", metadata={"task_type": "email"})
        assert answered_by(answer) == "qwen-3b"
        changed = {**doc["table"], "task_types": {**doc["table"]["task_types"],
                                                  "email": "architect"}}
        status, body, new_etag = await put(s, d.url, changed, if_match=etag)
        assert (status, body["version"], new_etag) == (200, 2, '"2"')
        _, answer = await chat(client, "auto", metadata={"task_type": "email"})
        assert answered_by(answer) == "qwen-72b"
        saved = json.loads((tmp_path / "t.json").read_text())
        assert saved["version"] == 2
    async with cluster(tmp_path, agents=tiers()) as (d, client, s, _):  # a new dispatcher
        async with s.get(d.url + "/v1/routing") as resp:
            doc = await resp.json()
        assert (doc["version"], doc["source"]) == (2, "file")
        _, answer = await chat(client, "auto", metadata={"task_type": "email"})
        assert answered_by(answer) == "qwen-72b"


async def test_a_stale_concurrent_write_gets_412(tmp_path):
    async with cluster(tmp_path) as (d, _, s, _):
        one = {**TABLE, "task_types": {**TABLE["task_types"], "email": "builder"}}
        two = {**TABLE, "task_types": {**TABLE["task_types"], "email": "architect"}}
        results = await asyncio.gather(put(s, d.url, one, if_match='"1"'),
                                       put(s, d.url, two, if_match='"1"'))
        assert sorted(r[0] for r in results) == [200, 412]
        stale = next(r for r in results if r[0] == 412)[1]["error"]
        assert stale["code"] == "stale_version"
        assert "version 2" in stale["message"]
        async with s.get(d.url + "/v1/routing") as resp:
            assert (await resp.json())["version"] == 2


async def test_a_table_naming_a_role_nobody_serves_is_refused_naming_it(tmp_path):
    async with cluster(tmp_path) as (d, _, s, _):
        bad = {**TABLE, "task_types": {**TABLE["task_types"], "infra": "operater"}}
        status, body, _ = await put(s, d.url, bad)
        assert status == 400
        assert "operater" in body["error"]["message"]
        status, _, _ = await put(s, d.url, {**bad, "declared_roles": ["operater"]})
        assert status == 200
        status, body, _ = await put(s, d.url, {"keyword_rules": [{"pattern": "("}]})
        assert status == 400
        assert "keyword_rules.0" in body["error"]["message"]


async def test_only_an_admin_key_or_the_cluster_token_may_edit_the_table(tmp_path):
    async with cluster(tmp_path) as (d, _, s, _):
        assert (await put(s, d.url, TABLE, key=None))[0] == 403
        assert (await put(s, d.url, TABLE, key="guess"))[0] == 403
        assert (await put(s, d.url, TABLE, key=TOKEN))[0] == 200
        assert (await put(s, d.url, TABLE, key=ADMIN))[0] == 200


async def test_route_explains_which_rule_fires_for_given_traits(tmp_path):
    async with cluster(tmp_path) as (d, _, s, _):
        async with s.get(d.url + "/v1/route", params={"model": "builder",
                                                      "text": "helm install x"}) as resp:
            route = await resp.json()
        assert route["routing"]["rule"] == "task_type:infra"
        assert route["routing"]["task_type_source"] == "keyword"
        assert route["winner"]["model_id"] == "qwen-3b"
        async with s.get(d.url + "/v1/route", params={"model": "x", "images": "1"}) as resp:
            assert (await resp.json())["routing"]["target"] == "vision"


async def test_a_classifier_role_gives_the_task_type_and_its_default_when_it_fails(tmp_path):
    big, small = tiers()
    clf = FakeAgent("clf", [FakeDevice("gpu:0")], [FakeModel("tiny-1b", ["classifier"])])
    table = {**TABLE, "content_rules": [],
             "classifier": {"role": "classifier", "timeout_s": 0.5,
                            "default_task_type": "implementation"}}
    async with cluster(tmp_path, table, agents=(big, small, clf)) as (_, client, _, _):
        clf.knobs.answer_text = "Design."
        h, answer = await chat(client, "auto", "sketch the module layout")
        assert answered_by(answer) == "qwen-72b"
        assert h["x-rolemesh-task-type-source"] == "classifier"
        asked = len(clf.seen)
        await chat(client, "auto", "sketch the module layout")  # the same prefix: cached
        assert len(clf.seen) == asked
        clf.knobs.answer_text = "no idea"
        h, answer = await chat(client, "auto", "something else")
        assert (answered_by(answer), h["x-rolemesh-task-type-source"]) == \
            ("coder-14b", "classifier_fallback")
        clf.knobs.hold = asyncio.Event()  # never answers in time
        h, answer = await chat(client, "auto", "a third thing")
        assert (answered_by(answer), h["x-rolemesh-task-type-source"]) == \
            ("coder-14b", "classifier_fallback")
        clf.knobs.hold.set()
        h, answer = await chat(client, "builder", "a fourth")  # a served role: not asked
        assert "x-rolemesh-task-type" not in h


async def test_every_llama_server_endpoint_is_routed_and_names_the_model(tmp_path):
    async with cluster(tmp_path) as (d, _, s, agents):
        for path in ("/v1/embeddings", "/v1/rerank", "/infill", "/v1/messages",
                     "/v1/responses", "/tokenize", "/detokenize", "/v1/completions"):
            async with s.post(d.url + path, json={"model": "builder", "prompt": "x"}) as resp:
                assert resp.status == 200, path
                assert resp.headers["X-RoleMesh-Target"] == "builder"
            assert agents[1].seen[-1].path == path
            assert agents[1].seen[-1].body["model"] == "coder-14b"


async def test_models_lists_the_task_types_a_request_may_name(tmp_path):
    async with cluster(tmp_path) as (_, client, _, _):
        listed = {m.id: m for m in (await client.models.list()).data}
        assert listed["infra"].model_extra["kind"] == "task_type"
        assert listed["infra"].model_extra["role"] == "operator"
        assert listed["infra"].model_extra["models"] == ["qwen-3b"]
        assert listed["builder"].model_extra["kind"] == "role"


async def test_turns_arriving_together_share_one_classifier_question(tmp_path):
    big, small = tiers()
    small.devices["gpu:0"].pending_limit = 8  # the three turns fit at once
    clf = FakeAgent("clf", [FakeDevice("gpu:0", pending_limit=8)],
                    [FakeModel("tiny-1b", ["classifier"])])
    table = {**TABLE, "content_rules": [],
             "classifier": {"role": "classifier", "timeout_s": 60}}
    async with cluster(tmp_path, table, agents=(big, small, clf)) as (_, client, _, _):
        clf.knobs.answer_text = "infra"
        clf.knobs.hold = asyncio.Event()
        turns = [asyncio.create_task(chat(client, "auto", "rotate the certificates"))
                 for _ in range(3)]
        await wait_until(lambda: len(clf.seen) >= 1, timeout_s=10, what="a question")
        clf.knobs.hold.set()
        answers = await asyncio.gather(*turns)
        assert [answered_by(a) for _, a in answers] == ["qwen-3b"] * 3
        assert len(clf.seen) == 1
