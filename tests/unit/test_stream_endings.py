"""Telling a stream that an upstream ended with an SSE error event from a clean one."""

from __future__ import annotations

import json

import pytest

from rolemesh.errors import InvalidJSON
from rolemesh.openai_body import parse_request_head
from rolemesh.proxying import ends_with_error_event, error_event_code, sse_error_event


@pytest.mark.parametrize(("tail", "expected"), [
    (b'data: {"choices": []}\n\ndata: [DONE]\n\n', False),
    (b'data: {"choices": []}\n\n' + sse_error_event("boom"), True),
    (b'data: {"choices": []}\n\ndata:{"error": {"message": "x"}}\n\n', True),
    (b'data: {"choices": [{"delta": {"content": "{\\"error\\""}}]}\n\n', False),
    (b"", False),
    (b": keep-alive comment\n\n", False),
])
def test_the_last_event_decides(tail, expected):
    assert ends_with_error_event(tail) is expected


def test_the_error_event_is_one_openai_shaped_sse_event():
    raw = sse_error_event("stalled", code="upstream_timeout")
    assert raw.startswith(b"data: ")
    assert raw.endswith(b"\n\n")
    assert raw.count(b"\n\n") == 1
    assert json.loads(raw[6:])["error"] == {"message": "stalled", "type": "server_error",
                                            "code": "upstream_timeout"}


def test_json_nested_ten_thousand_deep_is_a_400_not_a_recursion_error():
    with pytest.raises(InvalidJSON):
        parse_request_head(b'{"model": "m", "x": ' + b"[" * 10000 + b"]" * 10000 + b"}")


@pytest.mark.parametrize(("tail", "code"), [
    (b'data: {"choices": []}\n\n' + sse_error_event("x", code="model_switch"), "model_switch"),
    (sse_error_event("boom"), "upstream_failed"),
    (b'data: {"error": {"code": 500}}\n\n', None),
    (b"data: [DONE]\n\n", None),
])
def test_the_code_of_a_closing_error_event_is_read(tail, code):
    assert error_event_code(tail) == code
