"""Read just enough of an OpenAI request body: `model` and `stream`, nothing else.

The bytes are forwarded untouched; parsing the rest would cost CPU on the hot path and
risk changing what the client sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rolemesh.errors import BadRequest, InvalidJSON, MissingModel

# Every path llama-server serves that RoleMesh passes through (checked against the
# llama-server build in use: docs/api.md lists them; tests/real/ calls each one).
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank",
                "/infill", "/v1/messages", "/v1/responses", "/tokenize", "/detokenize")


@dataclass(frozen=True)
class OpenAIRequestHead:
    model: str
    stream: bool
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def parse_request_head(body: bytes) -> OpenAIRequestHead:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # json.loads recurses once per level of nesting
        raise InvalidJSON("the request body is nested too deeply to read") from exc
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    model = data.get("model")
    if model is None or model == "":
        raise MissingModel("the request has no 'model': name a model id or a role")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    return OpenAIRequestHead(model=model, stream=stream, data=data)
