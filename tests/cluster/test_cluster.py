"""Dispatcher + node agents as real processes, driven by the openai SDK as a client would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.cluster.harness import TOKEN, model_entry, routed_node, start_cluster
from tests.waiting import wait_until_sync

MSG = [{"role": "user", "content": "hi"}]


def post_json(url: str, data: object, headers: dict[str, str] | None = None
              ) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def ask(client: openai.OpenAI, model: str, max_tokens: int = 4) -> str:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MSG,
                                                           max_tokens=max_tokens)
    raw.parse()
    return routed_node(raw)


@pytest.fixture
def letters_everywhere(tmp_path, tiny_models, fake_llama_server_bin):
    """Two single-device nodes that both serve the letters model as role 'chat'."""
    def models(**extra):
        return [model_entry("letters", tiny_models["letters"], ["chat"], **extra)]
    return lambda **kw: start_cluster(tmp_path, fake_llama_server_bin,
                                      {"node-a": models(**kw.pop("model_extra", {})),
                                       "node-b": models()}, **kw)


def test_fifty_requests_for_a_loaded_model_all_go_to_its_device(letters_everywhere):
    with letters_everywhere() as cluster:
        client = cluster.client()
        first = ask(client, "chat")
        other = "node-b" if first == "node-a" else "node-a"
        served = [ask(client, "chat") for _ in range(50)]
        assert set(served) == {first}
        assert len(cluster.spawns(first)) == 1
        assert cluster.spawns(other) == []  # no other device loaded it
        nodes = cluster.nodes()
        [letters] = nodes[first]["devices"][0]["status"]["instances"]
        assert (letters["model_id"], letters["state"]) == ("letters", "ready")
        assert nodes[other]["devices"][0]["status"]["instances"] == []


def test_concurrent_requests_beyond_one_device_spread_to_a_second(letters_everywhere):
    with letters_everywhere(model_extra={"server_args": {"--fake-tokens-per-s": 20}}) as c:
        client = c.client()
        ask(client, "chat")
        # Each device takes 2 (1 running + 1 waiting): 4 at once need both devices.
        with ThreadPoolExecutor(4) as pool:
            served = list(pool.map(lambda _: ask(client, "chat", max_tokens=10), range(4)))
        assert set(served) == {"node-a", "node-b"}


def test_with_every_device_full_the_next_request_gets_503_with_retry_after(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = [model_entry("letters", tiny_models["letters"], ["chat"],
                          server_args={"--fake-tokens-per-s": 10})]
    with start_cluster(tmp_path, fake_llama_server_bin, {"node-a": models},
                       dispatcher_extra={"max_buffered_requests": 0},  # buffering off
                       agent_extra={"max_pending_requests_per_device": 1}) as cluster:
        client = cluster.client()
        ask(client, "chat")
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(ask, client, "chat", 30)
            wait_until_sync(lambda: cluster.nodes()["node-a"]["devices"][0]
                            ["dispatcher_in_flight"] == 1, what="one in flight")
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as err:
                ask(client, "chat")
            assert time.monotonic() - started < 2.5  # at once, not after the slow one
            assert err.value.status_code == 503
            assert int(err.value.response.headers["retry-after"]) >= 1
            assert err.value.body["code"] in ("device_busy", "no_node_available")
            assert slow.result() == "node-a"


def test_an_agent_answering_503_does_not_fail_the_request(
        tmp_path, tiny_models, fake_llama_server_bin):
    letters = model_entry("letters", tiny_models["letters"], ["chat"],
                          server_args={"--fake-tokens-per-s": 10})
    # Heartbeats a minute apart: after registering, the dispatcher cannot see node-a fill
    # up. (With its usual beat it may see that and rightly hold the request for node-a.)
    with start_cluster(tmp_path, fake_llama_server_bin,
                       {"node-a": [{**letters, "preload": True}], "node-b": [letters]},
                       dispatcher_extra={"heartbeat_interval_s": 60.0, "node_timeout_s": 600.0,
                                        "node_forget_s": 1200.0},
                       agent_extra={"max_pending_requests_per_device": 1}) as cluster:
        client = cluster.client()
        first = cluster.agents["node-a"]
        wait_until_sync(lambda: [i["state"] for i in first.get(
            "/v1/node/inventory", TOKEN)["devices"][0]["instances"]] == ["ready"],
            what="letters ready on node-a")
        # What the dispatcher knows from registering: node-a holds letters, nothing runs.
        seen = cluster.nodes()["node-a"]["devices"][0]["status"]
        assert [i["model_id"] for i in seen["instances"]] == ["letters"]
        # Someone calls the loaded agent directly: the dispatcher cannot know it is full.
        direct = openai.OpenAI(base_url=first.url + "/v1", api_key=TOKEN, max_retries=0)
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(direct.chat.completions.create, model="chat", messages=MSG,
                               max_tokens=30)
            wait_until_sync(lambda: first.get("/v1/node/inventory", TOKEN)["devices"][0]
                            ["in_flight"] == 1, what="busy")
            assert cluster.nodes()["node-a"]["devices"][0]["status"]["in_flight"] == 0
            assert ask(client, "chat") == "node-b"
            busy.result()
        # It went to node-a first (what the dispatcher saw) and on after node-a's 503.
        with urllib.request.urlopen(cluster.dispatcher.url + "/metrics") as answer:
            failovers = [line for line in answer.read().decode().splitlines()
                         if line.startswith("rolemesh_dispatcher_failovers_total{")]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in failovers) == 1.0


def test_a_killed_agent_does_not_fail_requests_that_had_not_started(letters_everywhere):
    with letters_everywhere() as cluster:
        client = cluster.client()
        first = ask(client, "chat")
        other = "node-b" if first == "node-a" else "node-a"
        cluster.agents[first].proc.kill()
        cluster.agents[first].proc.wait()
        # Before its heartbeats are missed, the dispatcher still routes there: connection
        # refused before any byte, so it fails over.
        assert ask(client, "chat") == other
        cluster.wait_nodes("down", [first])


def test_a_node_that_stops_heartbeating_is_avoided_and_routable_again_when_back(
        letters_everywhere):
    with letters_everywhere() as cluster:
        client = cluster.client()
        first = ask(client, "chat")
        other = "node-b" if first == "node-a" else "node-a"
        os.kill(cluster.agents[first].proc.pid, signal.SIGSTOP)
        cluster.wait_nodes("down", [first])
        assert {ask(client, "chat") for _ in range(3)} == {other}
        os.kill(cluster.agents[other].proc.pid, signal.SIGSTOP)
        os.kill(cluster.agents[first].proc.pid, signal.SIGCONT)
        cluster.wait_nodes("up", [first], timeout_s=5)
        cluster.wait_nodes("down", [other])
        assert ask(client, "chat") == first
        os.kill(cluster.agents[other].proc.pid, signal.SIGCONT)


def test_streaming_through_both_hops_delivers_the_first_chunk_before_the_last_is_made(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = [model_entry("letters", tiny_models["letters"], ["chat"],
                          server_args={"--fake-tokens-per-s": 10})]
    with start_cluster(tmp_path, fake_llama_server_bin, {"node-a": models}) as cluster:
        client = cluster.client()
        stream = client.chat.completions.create(model="chat", messages=MSG, max_tokens=20,
                                                stream=True)
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices
        # Generation (20 tokens at 10/s) is still going on the node when the first arrives.
        inventory = cluster.agents["node-a"].get("/v1/node/inventory", TOKEN)
        assert inventory["devices"][0]["in_flight"] == 1
        rest = list(chunks)
        text = "".join((c.choices[0].delta.content or "") for c in [first, *rest] if c.choices)
        assert "letters" in text


def test_registration_and_heartbeat_without_the_token_get_401(letters_everywhere):
    with letters_everywhere() as cluster:
        url = cluster.dispatcher.url
        inv = cluster.agents["node-a"].get("/v1/node/inventory", TOKEN)
        status, body = post_json(url + "/v1/nodes/register", {"inventory": inv})
        assert status == 401
        assert body["error"]["code"] == "invalid_token"
        status, _ = post_json(url + "/v1/nodes/heartbeat",
                              {"node_id": "node-a", "seq": 10**6, "devices": inv["devices"]},
                              {"Authorization": "Bearer wrong"})
        assert status == 401
        assert cluster.nodes()["node-a"]["state"] == "up"  # nothing was disturbed


def test_with_api_keys_set_a_client_without_a_key_gets_401(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = [model_entry("letters", tiny_models["letters"], ["chat"])]
    with start_cluster(tmp_path, fake_llama_server_bin, {"node-a": models},
                       dispatcher_extra={"api_keys": ["sk-team"]}) as cluster:
        with pytest.raises(openai.AuthenticationError):
            ask(cluster.client(api_key="sk-wrong"), "chat")
        assert ask(cluster.client(api_key="sk-team"), "chat") == "node-a"


def test_unknown_role_gets_404_naming_it(letters_everywhere):
    with letters_everywhere() as cluster:
        with pytest.raises(openai.NotFoundError) as err:
            ask(cluster.client(), "astronomer")
        assert "astronomer" in str(err.value)


def test_a_request_id_follows_the_request_into_both_services_logs(letters_everywhere):
    with letters_everywhere() as cluster:
        client = cluster.client()
        raw = client.chat.completions.with_raw_response.create(
            model="chat", messages=MSG, max_tokens=2, extra_headers={"X-Request-Id": "trace-42"})
        node = routed_node(raw)
        assert raw.headers["x-request-id"] == "trace-42"

        def lines_with_id(text: str) -> list[dict]:
            out = []
            for line in text.splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("request_id") == "trace-42":
                        out.append(event)
            return out

        wait_until_sync(lambda: lines_with_id(cluster.agents[node].log()), what="agent log")
        agent_events = lines_with_id(cluster.agents[node].log())
        dispatcher_events = lines_with_id(cluster.dispatcher.log())
        done = [e for e in agent_events if e["event"] == "request.done"]
        assert done
        assert done[0]["status"] == 200
        assert done[0]["model"] == "letters"
        assert any(e["event"] == "request.done" for e in dispatcher_events)
        assert TOKEN not in cluster.dispatcher.log() + cluster.agents[node].log()


def test_a_client_that_leaves_mid_stream_frees_the_device_on_both_hops(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = [model_entry("letters", tiny_models["letters"], ["chat"],
                          server_args={"--fake-tokens-per-s": 5})]
    with start_cluster(tmp_path, fake_llama_server_bin, {"node-a": models}) as cluster:
        body = json.dumps({"model": "chat", "stream": True, "max_tokens": 200,
                           "messages": MSG}).encode()
        request = urllib.request.Request(cluster.dispatcher.url + "/v1/chat/completions",
                                         body, {"Content-Type": "application/json"})
        resp = urllib.request.urlopen(request, timeout=30)
        assert resp.readline().startswith(b"data: ")

        def agent_in_flight() -> int:
            inv = cluster.agents["node-a"].get("/v1/node/inventory", TOKEN)
            return int(inv["devices"][0]["in_flight"])

        assert agent_in_flight() == 1
        resp.close()  # the client goes away after one chunk of a 40 s answer
        wait_until_sync(lambda: agent_in_flight() == 0, timeout_s=10, what="agent freed")
        wait_until_sync(lambda: cluster.nodes()["node-a"]["devices"][0]
                        ["dispatcher_in_flight"] == 0, timeout_s=10, what="dispatcher freed")
        assert ask(cluster.client(), "chat") == "node-a"  # and the device serves again
