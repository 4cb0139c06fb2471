"""The proxy's pure helpers: state headers, alias bodies, agent error codes; token checks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from dispatcher.forwarding import error_code, observed_state, retry_after
from rolemesh.api import InstanceState
from rolemesh.http import token_matches

KEY = ("node-a", "gpu:0")
S = InstanceState


def proxy(**h: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in h.items()}))


def test_state_headers_of_an_agent_answer_are_read():
    h = proxy(**{"X-RoleMesh-Residents": "m1=ready,m2=starting",
                 "X-RoleMesh-In-Flight": "2", "X-RoleMesh-Pending": "1"})
    assert observed_state(h, KEY) == ((("m1", S.READY), ("m2", S.STARTING)), 2, 1)


def test_an_empty_residents_header_means_an_empty_device():
    h = proxy(**{"X-RoleMesh-Residents": ""})
    assert observed_state(h, KEY) == ((), 0, 0)


def test_a_group_placement_is_matched_as_a_whole():
    h = proxy(**{"X-RoleMesh-Residents": "big=ready", "X-RoleMesh-Device": "gpu:0+gpu:1"})
    assert observed_state(h, ("node-a", "gpu:0+gpu:1")) == ((("big", S.READY),), 0, 0)
    assert observed_state(h, KEY) is None


def test_state_headers_naming_another_node_or_device_are_ignored():
    base = {"X-RoleMesh-Residents": "m1=ready"}
    assert observed_state(proxy(**base, **{"X-RoleMesh-Node": "node-a",
                                           "X-RoleMesh-Device": "gpu:0"}), KEY) is not None
    assert observed_state(proxy(**base, **{"X-RoleMesh-Node": "node-b"}), KEY) is None
    assert observed_state(proxy(**base, **{"X-RoleMesh-Device": "gpu:1"}), KEY) is None


@pytest.mark.parametrize("h", [
    {},
    {"X-RoleMesh-Residents": "m1=exploded"},
    {"X-RoleMesh-Residents": "m1"},
    {"X-RoleMesh-Residents": "m1=ready", "X-RoleMesh-In-Flight": "many"},
])
def test_missing_or_garbled_state_headers_are_ignored(h):
    assert observed_state(proxy(**h), KEY) is None


@pytest.mark.parametrize(("body", "code"), [
    (b'{"error": {"code": "device_busy", "message": "x"}}', "device_busy"),
    (b'{"error": {"code": 7}}', None),
    (b'{"error": "busy"}', None),
    (b"<html>503</html>", None),
    (b"[]", None),
])
def test_error_code_reads_an_openai_error_body(body, code):
    assert error_code(body) == code


def test_retry_after_reads_seconds():
    assert retry_after("3") == 3.0
    assert retry_after(None) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


def bearer(token: str | None) -> Any:
    h = {} if token is None else {"Authorization": f"Bearer {token}"}
    return SimpleNamespace(headers=h)  # what token_matches reads of a request


def test_token_matches_any_accepted_key_and_nothing_else():
    assert token_matches(bearer("b"), ["a", "b"])
    assert token_matches(bearer("a"), "a")
    assert not token_matches(bearer("c"), ["a", "b"])
    assert not token_matches(bearer(None), ["a"])
    assert not token_matches(bearer("a"), [])
    assert not token_matches(bearer(""), ["a"])


def test_a_token_with_bytes_that_are_not_utf8_matches_nothing_and_raises_nothing():
    # aiohttp hands such header bytes over as lone surrogates
    assert not token_matches(bearer("sk-\udcff\udcfe"), ["sk-x", "a"])
    assert not token_matches(bearer("\u00e9t\u00e9"), ["a"])
