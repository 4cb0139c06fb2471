"""The optional classifier role: a small model asked which task type a request is.

Bounded in time; a slow, failed or unparseable answer gives the configured default instead.
Answers are cached per conversation prefix (system prompt + first user message), so a
conversation is classified once, not at every turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from rolemesh.errors import RoleMeshError
from rolemesh.request_features import RequestFeatures
from rolemesh.routing_rules import (
    RoutingTable,
    TaskTypeFound,
    TaskTypeSource,
    parse_classifier_answer,
)

log = structlog.get_logger("dispatcher.classifier")

# (path, body, name) -> the answer's bytes; the dispatcher's own forwarding to `name`.
Call = Callable[[str, dict[str, Any], str], Awaitable[bytes]]


def classifier_prompt(f: RequestFeatures, task_types: list[str], max_chars: int
                      ) -> list[dict[str, str]]:
    text = "\n---\n".join(t[:max_chars] for t in (f.system_text, f.first_user_text or
                                                   f.last_user_text) if t)
    return [
        {"role": "system", "content": (
            "You sort requests into task types. Answer with exactly one word, one of: "
            f"{', '.join(task_types)}. No other text.")},
        {"role": "user", "content": text or "(empty)"},
    ]


def answer_text(data: bytes) -> str:
    try:
        answer = json.loads(data)
        return str(answer["choices"][0]["message"]["content"] or "")
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


class Classifier:
    def __init__(self, call: Call) -> None:
        self._call = call
        self._cache: OrderedDict[str, str] = OrderedDict()
        # One question per prefix at a time: the turns of a conversation that arrive
        # together wait for the same answer instead of each asking the small model.
        self._asking: dict[str, asyncio.Future[TaskTypeFound | None]] = {}

    @staticmethod
    def prefix_key(f: RequestFeatures) -> str:
        h = hashlib.sha256()
        h.update(f.system_text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
        h.update((f.first_user_text or f.last_user_text).encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    async def classify(self, f: RequestFeatures, table: RoutingTable) -> TaskTypeFound | None:
        if table.classifier is None:
            return None
        key = self.prefix_key(f)
        cached = self._cache.get(key)
        if cached is not None and cached in table.task_types:
            self._cache.move_to_end(key)
            return TaskTypeFound(cached, TaskTypeSource.CLASSIFIER, "cached")
        while (asking := self._asking.get(key)) is not None:
            try:
                return await asyncio.shield(asking)
            except asyncio.CancelledError:
                if not asking.cancelled():
                    raise  # this request was cancelled
                # the request that asked went away: ask again, for this one
        future: asyncio.Future[TaskTypeFound | None] = \
            asyncio.get_running_loop().create_future()
        self._asking[key] = future
        try:
            found = await self._ask(f, table, key)
        except BaseException:
            future.cancel()  # waiters ask again themselves
            raise
        else:
            future.set_result(found)
            return found
        finally:
            del self._asking[key]

    async def _ask(self, f: RequestFeatures, table: RoutingTable, key: str
                   ) -> TaskTypeFound | None:
        settings = table.classifier
        assert settings is not None  # checked by classify()
        types = list(table.task_types)
        body = {"messages": classifier_prompt(f, types, settings.max_prompt_chars),
                "max_tokens": 8, "temperature": 0, "stream": False}
        why = ""
        try:
            async with asyncio.timeout(settings.timeout_s):
                data = await self._call("/v1/chat/completions", body, settings.role)
        except TimeoutError:
            why = f"no answer in {settings.timeout_s:g}s"
        except RoleMeshError as err:
            why = f"{err.code}: {err.message[:200]}"
        else:
            text = answer_text(data)
            found = parse_classifier_answer(text, types)
            if found is not None:
                if settings.cache_size:
                    self._cache[key] = found
                    while len(self._cache) > settings.cache_size:
                        self._cache.popitem(last=False)
                return TaskTypeFound(found, TaskTypeSource.CLASSIFIER, settings.role)
            why = f"unparseable answer {text[:80]!r}"
        default = settings.default_task_type or table.default_task_type
        log.info("classifier.fallback", role=settings.role, why=why, default=default)
        if default is None:
            return None
        return TaskTypeFound(default, TaskTypeSource.CLASSIFIER_FALLBACK, why)
