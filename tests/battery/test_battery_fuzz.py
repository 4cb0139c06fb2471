"""Battery 9: fuzz both services with hostile bodies, headers and paths (hypothesis).

Every answer must be a designed one: no 5xx but a 503 with Retry-After, and every error on
a /v1 path is JSON in the OpenAI shape. The known cases are always in the mix: JSON nested
10,000 deep, gzip that is not, non-ASCII bytes in Authorization, NaN in a registration.
"""

from __future__ import annotations

import gzip
import json
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.battery.harness import API_KEY, TOKEN, AgentSpec, fake_models, start_battery

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
         "/v1/nodes", "/v1/nodes/register", "/v1/nodes/heartbeat", "/v1/route?model=chat",
         "/v1/route", "/v1/node/inventory", "/health", "/metrics", "/v1/nodes/node-a"]
COUNTS: dict[str, Counter[int]] = {"dispatcher": Counter(), "agent": Counter()}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
openai_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["chat", "letters", "", "nope", 7, None, ["chat"]])},
    optional={"stream": st.sampled_from([True, False, "yes", None, 1]),
              "messages": st.just([{"role": "user", "content": "hi"}]) | json_values,
              "max_tokens": st.sampled_from([1, 2, -1, "many", 10**30]),
              "prompt": st.text(max_size=20), "input": st.text(max_size=20)})


def deep(n: int) -> bytes:
    return b'{"model": "chat", "x": ' + b"[" * n + b"]" * n + b"}"


def nan_registration() -> bytes:
    return (b'{"inventory": {"schema_version": 1, "node_id": "x", "url": "http://127.0.0.1:9",'
            b' "backend": "cpu", "seq": 1, "devices": [], "models": [], "load": NaN}}')


bodies = st.one_of(
    openai_bodies.map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.sampled_from([deep(10_000), deep(50), nan_registration(), b"", b"{", b"\xff\xfe",
                     b'{"model": "chat", "stream": true, "max_tokens": 3}']),
)
# Mostly a key that passes (so the bodies are read), sometimes none, a wrong one, bytes
# that are not UTF-8, or any bytes (control characters make it malformed HTTP).
auth = st.one_of(
    st.sampled_from([f"Bearer {API_KEY}".encode(), f"Bearer {TOKEN}".encode()]),
    st.sampled_from([f"Bearer {TOKEN}".encode(), f"Bearer {API_KEY}".encode()]),
    st.none(), st.just(b"Bearer sk-\xff\xfe\xe9"),
    st.binary(max_size=24).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
encodings = st.sampled_from([None, b"gzip", b"deflate", b"br", b"x-garbage", b"identity"])
OPENAI_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
paths = st.one_of(st.sampled_from(OPENAI_PATHS), st.sampled_from(PATHS), st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(
    lambda t: "/v1/" + t), st.sampled_from(["/%00", "/v1/%ff%fe", "/" + "a" * 5000, "//v1"]))
methods = st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])


def exchange(port: int, method: str, path: str, headers: dict[str, bytes],
             body: bytes) -> tuple[int, dict[str, str], bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
    for name, value in headers.items():
        head += name.encode() + b": " + value + b"\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    top, _, payload = raw.partition(b"\r\n\r\n")
    lines = top.split(b"\r\n")
    status = int(lines[0].split()[1])
    got = {}
    for line in lines[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        got[k.strip().lower()] = v.strip()
    if got.get("transfer-encoding") == "chunked":
        payload = dechunk(payload)
    return status, got, payload


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


def check(service: str, method: str, path: str, status: int, got: dict[str, str],
          payload: bytes) -> None:
    COUNTS[service][status] += 1
    if status >= 500:
        assert status == 503, (service, method, path, status, payload[:300])
        assert "retry-after" in got, (service, path, got)
    if path.startswith("/v1") and status >= 400 and method not in ("HEAD", "OPTIONS"):
        error = json.loads(payload)["error"]
        assert set(error) >= {"message", "type", "code"}, payload[:300]


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiny_models, fake_llama_server_bin) -> Iterator[dict[str, int]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    specs = [AgentSpec("node-a", [fake_models("letters", tiny_models["letters"], ["chat"],
                                              tmp / "node-a-spawns.jsonl")])]
    with start_battery(tmp, fake_llama_server_bin, specs) as cluster:
        yield {"dispatcher": cluster.dispatcher_config["listen_port"],
               "agent": cluster.agent_configs["node-a"]["listen_port"]}


FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def fuzz_one(ports: dict[str, int], service: str, method: str, path: str,
             authorization: bytes | None, encoding: bytes | None, body: bytes,
             gzipped: bool) -> None:
    headers: dict[str, bytes] = {"Content-Type": b"application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    if encoding is not None:
        headers["Content-Encoding"] = encoding
        if gzipped and encoding == b"gzip":
            body = gzip.compress(body)
    status, got, payload = exchange(ports[service], method, path, headers, body)
    check(service, method, path, status, got, payload)


@pytest.mark.parametrize("service", ["dispatcher", "agent"])
@FUZZ
@given(method=methods, path=paths, authorization=auth, encoding=encodings, body=bodies,
       gzipped=st.booleans())
def test_no_hostile_request_gets_an_undesigned_5xx_or_a_non_json_error(
        services: dict[str, Any], service, method, path, authorization, encoding, body,
        gzipped):
    fuzz_one(services, service, method, path, authorization, encoding, body, gzipped)


@pytest.mark.parametrize("service", ["dispatcher", "agent"])
@pytest.mark.parametrize(("path", "body", "headers"), [
    ("/v1/chat/completions", deep(10_000), {}),
    ("/v1/completions", deep(10_000), {}),
    ("/v1/embeddings", deep(10_000), {}),
    ("/v1/chat/completions", b"not gzip", {"Content-Encoding": b"gzip"}),
    ("/v1/chat/completions", b"\x00", {"Content-Encoding": b"deflate"}),
    ("/v1/embeddings", b'{"model": "chat", "input": "x"}', {}),
    ("/v1/models", b"", {"Authorization": b"Bearer sk-\xff\xfe\xe9t\xe9"}),
    ("/v1/nodes/register", nan_registration(), {"Authorization": TOKEN.encode()}),
], ids=["deep-chat", "deep-completions", "deep-embeddings", "bad-gzip", "tiny-bad-deflate",
        "embeddings-of-a-chat-model", "non-ascii-auth", "nan-registration"])
def test_the_cases_found_by_hand_get_4xx(services, service, path, body, headers):
    headers = {"Content-Type": b"application/json",
               "Authorization": f"Bearer {TOKEN}".encode(), **headers}
    if headers["Authorization"] == TOKEN.encode():
        headers["Authorization"] = b"Bearer " + TOKEN.encode()
    status, got, payload = exchange(services[service], "POST" if body else "GET", path,
                                    headers, body)
    check(service, "POST", path, status, got, payload)
    assert 400 <= status < 500, (status, payload[:200])


def test_zz_report_the_fuzz_counts(services):
    print("battery fuzz counts by status:",
          {k: dict(sorted(v.items())) for k, v in COUNTS.items()})
