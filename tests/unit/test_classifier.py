"""The classifier role's client: bounded, cached per prefix, one question per prefix at a time."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from dispatcher.classifier import Classifier
from rolemesh.errors import DeviceBusy
from rolemesh.request_features import RequestFeatures
from rolemesh.routing_rules import RoutingTable, TaskTypeSource
from tests.waiting import wait_until

TABLE = RoutingTable.model_validate({
    "task_types": {"design": "architect", "infra": "operator", "admin": "operator"},
    "classifier": {"role": "tiny", "timeout_s": 5, "default_task_type": "admin"}})


def features(first: str = "set up the cluster", system: str = "") -> RequestFeatures:
    return RequestFeatures(model="auto", system_text=system, first_user_text=first,
                           last_user_text=first)


def answer(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": text}}]}).encode()


class FakeRole:
    """The dispatcher's forwarding to the classifier role, as a recording function."""

    def __init__(self, text: str = "infra") -> None:
        self.text = text
        self.asked: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    async def __call__(self, path: str, body: dict[str, Any], name: str) -> bytes:
        assert (path, name) == ("/v1/chat/completions", "tiny")
        self.asked.append(body)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return answer(self.text)


async def test_the_answer_is_cached_per_conversation_prefix():
    role = FakeRole("Infra.")
    c = Classifier(role)
    first = await c.classify(features(), TABLE)
    assert first is not None
    assert (first.task_type, first.source) == ("infra", TaskTypeSource.CLASSIFIER)
    again = await c.classify(features(), TABLE)
    assert again is not None
    assert (again.task_type, again.rule) == ("infra", "cached")
    assert len(role.asked) == 1
    await c.classify(features("another conversation"), TABLE)
    assert len(role.asked) == 2
    prompt = role.asked[0]["messages"][0]["content"]
    assert "design, infra, admin" in prompt


async def test_a_slow_failed_or_unparseable_answer_gives_the_default_and_is_not_cached():
    role = FakeRole("no idea")
    c = Classifier(role)
    found = await c.classify(features(), TABLE)
    assert found is not None
    assert (found.task_type, found.source) == ("admin", TaskTypeSource.CLASSIFIER_FALLBACK)
    role.error = DeviceBusy("busy")
    found = await c.classify(features(), TABLE)
    assert found is not None
    assert found.source == TaskTypeSource.CLASSIFIER_FALLBACK
    assert "device_busy" in (found.rule or "")
    role.error, role.gate = None, asyncio.Event()  # never answers
    quick = TABLE.model_copy(update={"classifier": TABLE.classifier.model_copy(  # type: ignore[union-attr]
        update={"timeout_s": 0.05})})
    found = await c.classify(features(), quick)
    assert found is not None
    assert found.source == TaskTypeSource.CLASSIFIER_FALLBACK
    assert len(role.asked) == 3  # nothing was cached


async def test_when_the_request_that_asked_goes_away_a_waiting_one_asks_again():
    role = FakeRole("design")
    role.gate = asyncio.Event()
    c = Classifier(role)
    first = asyncio.create_task(c.classify(features(), TABLE))
    await wait_until(lambda: len(role.asked) == 1, what="the first question")
    second = asyncio.create_task(c.classify(features(), TABLE))
    await asyncio.sleep(0)  # let it start waiting on the first one's question
    first.cancel()
    await wait_until(lambda: len(role.asked) == 2, what="the second request asking")
    role.gate.set()
    found = await second
    assert found is not None
    assert found.task_type == "design"
