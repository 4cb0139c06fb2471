"""Read just enough of an OpenAI request body: `model` and `stream`, nothing else.

The bytes are forwarded untouched; parsing the rest would cost CPU on the hot path and
risk changing what the client sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rolemesh.errors import BadRequest, InvalidJSON, MissingModel

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass(frozen=True)
class OpenAIRequestHead:
    model: str
    stream: bool


def parse_request_head(body: bytes) -> OpenAIRequestHead:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from exc
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
    return OpenAIRequestHead(model=model, stream=stream)
