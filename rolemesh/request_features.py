"""A request, read once, as the few features routing rules need. Pure: no I/O, no clock.

Understands the bodies llama-server takes: OpenAI chat (`messages`, text and image content
parts), completions (`prompt`), embeddings (`input`), responses (`input`, `instructions`),
Anthropic messages (`system`, content blocks), infill, rerank and tokenize.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rolemesh import headers
from rolemesh.errors import BadRequest

IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
TEXT_KEYS = ("text", "content", "input_text")
PROMPT_KEYS = ("prompt", "input", "input_prefix", "input_suffix", "input_extra", "query",
               "documents", "instructions")
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per message, roughly


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    model: str
    stream: bool = False
    has_images: bool = False
    has_tools: bool = False
    prompt_tokens: int = 0  # an estimate: characters / chars_per_token, plus per message
    task_type: str | None = None  # as the request names it (header or metadata)
    task_type_in_body: bool = False
    latency: str | None = None  # "realtime", from the header or the body
    role_override: str | None = None  # X-RoleMesh-Role
    system_text: str = ""
    first_user_text: str = ""
    last_user_text: str = ""


def _name(value: object, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or any(c.isspace() for c in value.strip()):
        raise BadRequest(f"{what} must be one name without spaces, not {value!r}")
    return value.strip()


def features_from_headers(model: str, stream: bool, h: Mapping[str, str]) -> RequestFeatures:
    """What the headers alone say: enough when the table has no content rules."""
    return RequestFeatures(
        model=model, stream=stream,
        task_type=_name(h.get(headers.TASK_TYPE), headers.TASK_TYPE),
        latency=_name(h.get(headers.LATENCY), headers.LATENCY),
        role_override=_name(h.get(headers.ROLE), headers.ROLE))


def has_routing_headers(h: Mapping[str, str]) -> bool:
    return headers.TASK_TYPE in h or headers.LATENCY in h or headers.ROLE in h


def text_of(content: object) -> tuple[str, bool]:
    """(the text in a content value, whether it holds an image part)."""
    if content is None:
        return "", False
    if isinstance(content, str):
        return content, False
    if isinstance(content, list):
        texts, image = [], False
        for part in content:
            t, i = text_of(part)
            texts.append(t)
            image |= i
        return "\n".join(t for t in texts if t), image
    if isinstance(content, dict):
        if content.get("type") in IMAGE_PART_TYPES:
            return "", True
        for key in TEXT_KEYS:
            if key in content:
                return text_of(content[key])
    return "", False


@dataclass
class _Texts:
    chars: int = 0
    messages: int = 0
    images: bool = False
    system: list[str] = field(default_factory=list)
    user: list[str] = field(default_factory=list)

    def add(self, content: object, role: object = None) -> None:
        text, image = text_of(content)
        self.images |= image
        self.chars += len(text)
        if role in ("system", "developer"):
            self.system.append(text)
        elif role == "user":
            self.user.append(text)

    def add_messages(self, messages: list[Any]) -> None:
        for m in messages:
            if isinstance(m, dict):
                self.messages += 1
                self.add(m.get("content"), m.get("role"))


def _read_texts(data: Mapping[str, Any]) -> _Texts:
    t = _Texts()
    messages = data.get("messages")
    if isinstance(messages, list):
        t.add_messages(messages)
    for key in ("system", "instructions"):  # Anthropic messages, OpenAI responses
        if key in data:
            t.add(data[key], "system")
    for key in PROMPT_KEYS:
        value = data.get(key)
        if value is None or key == "instructions":
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) and "role" in v
                                                     for v in value):
            t.add_messages(value)  # the responses API: `input` is a list of messages
        else:
            t.add(value, "user" if isinstance(value, str) and key in ("prompt", "input",
                                                                      "query") else None)
    if "content" in data and not messages:  # /tokenize
        t.add(data["content"])
    return t


def features_from_body(data: Mapping[str, Any], model: str, stream: bool,
                       h: Mapping[str, str], *, chars_per_token: float = 4.0
                       ) -> RequestFeatures:
    base = features_from_headers(model, stream, h)
    t = _read_texts(data)
    tools = data.get("tools") or data.get("functions")
    if tools:
        t.chars += len(json.dumps(tools, separators=(",", ":")))
    metadata = data.get("metadata")
    task_type, in_body = base.task_type, False
    latency = base.latency
    if isinstance(metadata, dict):
        if task_type is None and metadata.get("task_type") is not None:
            task_type, in_body = _name(metadata["task_type"], "metadata.task_type"), True
        if latency is None:
            latency = _name(metadata.get("latency"), "metadata.latency")
    if latency is None:
        latency = _name(data.get("latency"), "'latency'")
    tokens = math.ceil(t.chars / chars_per_token) + MESSAGE_OVERHEAD_TOKENS * t.messages
    return RequestFeatures(
        model=model, stream=stream, has_images=t.images, has_tools=bool(tools),
        prompt_tokens=tokens, task_type=task_type, task_type_in_body=in_body,
        latency=latency, role_override=base.role_override,
        system_text="\n".join(x for x in t.system if x),
        first_user_text=t.user[0] if t.user else "",
        last_user_text=t.user[-1] if t.user else "")
