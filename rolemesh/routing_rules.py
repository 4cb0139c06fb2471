"""The routing table and its rules: a pure function of a request's features and the table.

No I/O, no clock. The dispatcher parses a request once into `RequestFeatures`
(rolemesh.request_features), then asks, in this order (first match wins):

1. `X-RoleMesh-Role: NAME` -> NAME (a per-request override);
2. `model` naming a model id -> that model (an override too: the client chose it);
3. the content rules, in the table's order (images, latency, prompt size, tools...);
4. the request's task type (named by header, `metadata.task_type` or `model`, or found by a
   keyword rule) -> its row in the table;
5. `model` naming a role or alias the cluster serves -> that name;
6. the task type that a classifier role or the table's default gives -> its row;
7. else `model` as it is (the dispatcher then answers 404 naming what it serves).

Fallbacks are looked up for the chosen target; the dispatcher uses them when the target
fits nowhere, when every device is busy, or when the prompt exceeds its models' context.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rolemesh.errors import BadRequest
from rolemesh.request_features import RequestFeatures

DEFAULT_TASK_TYPES = ("planning", "design", "audit", "review", "implementation", "infra",
                      "email", "admin")


class TableModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _is_name(value: str) -> bool:
    return bool(value) and not any(c.isspace() for c in value)


class When(TableModel):
    """A content rule's conditions; every condition given must hold (an empty one always does)."""

    images: bool | None = None  # image content parts present (True) or absent (False)
    tools: bool | None = None  # the request offers tools
    latency: str | None = None  # the latency hint equals this ("realtime")
    min_prompt_tokens: int | None = Field(default=None, ge=0)  # estimate >= this
    max_prompt_tokens: int | None = Field(default=None, ge=0)  # estimate < this
    task_types: list[str] | None = None  # the request's task type is one of these
    has_task_type: bool | None = None  # a task type was named or found (by header/keyword)

    def matches(self, f: RequestFeatures, task_type: str | None) -> bool:
        if self.images is not None and f.has_images != self.images:
            return False
        if self.tools is not None and f.has_tools != self.tools:
            return False
        if self.latency is not None and f.latency != self.latency:
            return False
        if self.min_prompt_tokens is not None and f.prompt_tokens < self.min_prompt_tokens:
            return False
        if self.max_prompt_tokens is not None and f.prompt_tokens >= self.max_prompt_tokens:
            return False
        if self.task_types is not None and task_type not in self.task_types:
            return False
        return self.has_task_type is None or (task_type is not None) == self.has_task_type


class ContentRule(TableModel):
    name: str
    when: When
    role: str  # a role, alias or model id


class KeywordRule(TableModel):
    """A regular expression (case-insensitive) over the system prompt and/or last user message."""

    name: str | None = None
    pattern: str
    task_type: str
    where: Literal["system", "last_user", "both"] = "both"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{value!r} is not a regular expression: {exc}") from exc
        return value

    @property
    def label(self) -> str:
        return self.name or self.pattern


class ClassifierSettings(TableModel):
    """A small model asked to answer with one of the task types."""

    role: str
    timeout_s: float = Field(default=2.0, gt=0, le=60)
    default_task_type: str | None = None  # on a slow or unparseable answer; None: the table's
    cache_size: int = Field(default=1024, ge=0)
    max_prompt_chars: int = Field(default=2000, ge=100)


class RoutingTable(TableModel):
    """What `routing:` in the dispatcher config holds, and what GET/PUT /v1/routing carry."""

    task_types: dict[str, str] = Field(default_factory=dict)  # task type -> role
    default_task_type: str | None = None
    keyword_rules: list[KeywordRule] = Field(default_factory=list)
    content_rules: list[ContentRule] = Field(default_factory=list)
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)  # role -> fallback roles
    classifier: ClassifierSettings | None = None
    declared_roles: list[str] = Field(default_factory=list)  # valid before a node serves them
    chars_per_token: float = Field(default=4.0, gt=0, le=64)

    @model_validator(mode="after")
    def _consistent(self) -> RoutingTable:
        for task_type, role in self.task_types.items():
            if not _is_name(task_type):
                raise ValueError(f"task_types: {task_type!r} is not a task type name")
            if not _is_name(role):
                raise ValueError(f"task_types: {task_type}: {role!r} is not a role name")
        known = self.task_types
        for i, k in enumerate(self.keyword_rules):
            if k.task_type not in known:
                raise ValueError(f"keyword_rules.{i}: task type {k.task_type!r} has no row in "
                                 f"task_types ({', '.join(known) or 'none'})")
        self._check_content_rules()
        defaults = [("default_task_type", self.default_task_type)]
        if self.classifier is not None:
            defaults.append(("classifier.default_task_type", self.classifier.default_task_type))
        for where, value in defaults:
            if value is not None and value not in known:
                raise ValueError(f"{where}: {value!r} has no row in task_types")
        for role, chain in self.fallbacks.items():
            if role in chain:
                raise ValueError(f"fallbacks: {role}: a role cannot fall back to itself")
        return self

    def _check_content_rules(self) -> None:
        seen: set[str] = set()
        for i, rule in enumerate(self.content_rules):
            if rule.name in seen:
                raise ValueError(f"content_rules.{i}: the name {rule.name!r} is used twice")
            seen.add(rule.name)
            for t in rule.when.task_types or ():
                if t not in self.task_types:
                    raise ValueError(f"content_rules.{i} ({rule.name}): task type {t!r} has "
                                     "no row in task_types")

    def named_roles(self) -> list[str]:
        """Every role the table sends requests to: each must be served or declared."""
        out = list(self.task_types.values()) + [r.role for r in self.content_rules]
        for role, chain in self.fallbacks.items():
            out += [role, *chain]
        if self.classifier is not None:
            out.append(self.classifier.role)
        return list(dict.fromkeys(out))

    @property
    def needs_content(self) -> bool:
        """Whether the rules read more of a request than `model` and the headers."""
        return bool(self.keyword_rules or self.content_rules)

    @cached_property
    def compiled_keywords(self) -> tuple[tuple[KeywordRule, re.Pattern[str]], ...]:
        return tuple((k, re.compile(k.pattern, re.IGNORECASE)) for k in self.keyword_rules)


def unknown_roles(table: RoutingTable, served: Collection[str],
                  declared: Iterable[str] = ()) -> list[str]:
    """The roles the table names that the cluster does not serve and nobody declared."""
    ok = set(declared) | set(table.declared_roles)
    return [r for r in table.named_roles() if r not in served and r not in ok]


class TaskTypeSource(StrEnum):
    HEADER = "header"  # X-RoleMesh-Task-Type
    METADATA = "metadata"  # the body's metadata.task_type
    MODEL = "model"  # `model` is itself a task type
    KEYWORD = "keyword"  # a keyword rule matched
    CLASSIFIER = "classifier"  # the classifier role answered
    CLASSIFIER_FALLBACK = "classifier_fallback"  # it was slow or unparseable: its default
    DEFAULT = "default"  # the table's default_task_type


@dataclass(frozen=True, slots=True)
class TaskTypeFound:
    task_type: str
    source: TaskTypeSource
    rule: str | None = None  # the keyword rule that matched


@dataclass(frozen=True, slots=True)
class RouteChoice:
    target: str  # the role, alias or model id the request goes to
    rule: str  # which rule fired: override:header, override:model, content:NAME, ...
    task: TaskTypeFound | None
    fallbacks: tuple[str, ...]
    wants_task_type: bool = False  # reached step 6 with no task type: a classifier may help


def find_task_type(f: RequestFeatures, table: RoutingTable) -> TaskTypeFound | None:
    """The task type the request names, else the first keyword rule that matches."""
    if f.task_type is not None:
        source = TaskTypeSource.METADATA if f.task_type_in_body else TaskTypeSource.HEADER
        return TaskTypeFound(f.task_type, source)
    if f.model in table.task_types:
        return TaskTypeFound(f.model, TaskTypeSource.MODEL)
    for rule, pattern in table.compiled_keywords:
        texts = ((f.system_text,) if rule.where == "system" else
                 (f.last_user_text,) if rule.where == "last_user" else
                 (f.system_text, f.last_user_text))
        if any(t and pattern.search(t) for t in texts):
            return TaskTypeFound(rule.task_type, TaskTypeSource.KEYWORD, rule.label)
    return None


def choose_route(f: RequestFeatures, table: RoutingTable, *, model_ids: Collection[str],
                 served: Collection[str], task: TaskTypeFound | None,
                 inferred: TaskTypeFound | None = None) -> RouteChoice:
    """Steps 1-7 of the module docstring. `task`: find_task_type's answer; `inferred`: what
    the classifier or the default gave, used only at step 6."""
    def done(target: str, rule: str, used: TaskTypeFound | None = task,
             wants: bool = False) -> RouteChoice:
        return RouteChoice(target, rule, used, tuple(table.fallbacks.get(target, ())), wants)

    if f.role_override is not None:
        return done(f.role_override, "override:header")
    if f.model in model_ids:
        return done(f.model, "override:model")
    task_type = task.task_type if task is not None else None
    for rule in table.content_rules:
        if rule.when.matches(f, task_type):
            return done(rule.role, f"content:{rule.name}")
    if task is not None:
        return done(_row(table, task), f"task_type:{task.task_type}")
    if f.model in served:
        return done(f.model, "name")
    if inferred is not None:
        return done(_row(table, inferred), f"task_type:{inferred.task_type}", inferred)
    if table.default_task_type is not None and table.classifier is None:
        found = TaskTypeFound(table.default_task_type, TaskTypeSource.DEFAULT)
        return done(_row(table, found), f"task_type:{found.task_type}", found)
    return done(f.model, "name", wants=table.classifier is not None)


def _row(table: RoutingTable, task: TaskTypeFound) -> str:
    role = table.task_types.get(task.task_type)
    if role is None:
        known = ", ".join(sorted(table.task_types)) or "none"
        raise BadRequest(f"task type {task.task_type!r} (from the {task.source.value}) has no "
                         f"row in the routing table; known task types: {known}")
    return role


def parse_classifier_answer(text: str, task_types: Sequence[str]) -> str | None:
    """The one task type a classifier answered, or None when its answer is not one of them.

    Tolerant of case, quotes, punctuation and a short sentence around the word; two
    different task types in the answer are ambiguous (None).
    """
    words = re.findall(r"[a-z0-9_\-]+", text.lower())
    lowered = {t.lower(): t for t in task_types}
    found = list(dict.fromkeys(lowered[w] for w in words if w in lowered))
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True, slots=True)
class ContextFit:
    target: str | None  # None: nothing has room
    model_ids: tuple[str, ...]  # the target's models that have room
    largest_ctx: int | None  # the largest context seen, for the error


def fit_context(prompt_tokens: int, targets: Sequence[str],
                models_of: Mapping[str, Sequence[str]],
                ctx_of: Mapping[str, int | None]) -> ContextFit:
    """The first target with a model whose context holds the prompt (unknown ctx: it may).

    `targets` are tried in order (the chosen one, then its fallbacks, then the table's roles).
    """
    largest: int | None = None
    for target in targets:
        roomy = []
        for m in models_of.get(target, ()):
            ctx = ctx_of.get(m)
            if ctx is not None:
                largest = ctx if largest is None else max(largest, ctx)
            if ctx is None or prompt_tokens <= ctx:
                roomy.append(m)
        if roomy:
            return ContextFit(target, tuple(roomy), largest)
    return ContextFit(None, (), largest)
