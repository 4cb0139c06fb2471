"""A request read once into the features routing rules need."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rolemesh.errors import BadRequest
from rolemesh.request_features import features_from_body, features_from_headers


def feats(body, headers=None, **kw):
    return features_from_body(body, body.get("model", "m"), False, headers or {}, **kw)


def test_an_image_content_part_is_seen_in_chat_responses_and_anthropic_bodies():
    chat = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    responses = {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "describe"}, {"type": "input_image", "image_url": "x"}]}]}
    anthropic = {"system": "be brief", "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]}]}
    for body in (chat, responses, anthropic):
        assert feats(body).has_images
    assert not feats({"messages": [{"role": "user", "content": "no image here"}]}).has_images
    assert feats(chat).last_user_text == "what is this"


def test_prompt_tokens_grow_with_the_text_in_every_body_shape():
    short = feats({"messages": [{"role": "user", "content": "hi"}]}).prompt_tokens
    long_ = feats({"messages": [{"role": "user", "content": "x" * 4000}]}).prompt_tokens
    assert short < 10
    assert 1000 <= long_ < 1100
    assert feats({"prompt": "y" * 400}).prompt_tokens == 100
    assert 20 <= feats({"input": ["a" * 40, "b" * 40]}).prompt_tokens <= 21
    assert feats({"input_prefix": "a" * 8, "input_suffix": "b" * 8}).prompt_tokens == 4
    assert feats({"content": "z" * 80}).prompt_tokens == 20  # /tokenize
    assert feats({"prompt": "y" * 400}, chars_per_token=1.0).prompt_tokens == 400


def test_tools_count_as_present_and_as_prompt():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = feats({"messages": [{"role": "user", "content": "hi"}], "tools": tools})
    assert with_tools.has_tools
    assert with_tools.prompt_tokens > feats({"messages": [{"role": "user",
                                                           "content": "hi"}]}).prompt_tokens


def test_system_first_and_last_user_texts_are_kept_for_keyword_rules():
    f = feats({"messages": [{"role": "system", "content": "You are an SRE"},
                            {"role": "user", "content": "first"},
                            {"role": "assistant", "content": "ok"},
                            {"role": "user", "content": [{"type": "text", "text": "last"}]}]})
    assert (f.system_text, f.first_user_text, f.last_user_text) == \
        ("You are an SRE", "first", "last")


def test_the_task_type_comes_from_the_header_before_the_body_metadata():
    body = {"messages": [], "metadata": {"task_type": "email", "latency": "realtime"}}
    f = feats(body)
    assert (f.task_type, f.task_type_in_body, f.latency) == ("email", True, "realtime")
    f = feats(body, {"X-RoleMesh-Task-Type": "infra", "X-RoleMesh-Latency": "batch"})
    assert (f.task_type, f.task_type_in_body, f.latency) == ("infra", False, "batch")
    assert feats({"latency": "realtime"}).latency == "realtime"


def test_headers_alone_give_the_override_task_type_and_latency():
    f = features_from_headers("planner", True, {"X-RoleMesh-Role": "builder"})
    assert (f.model, f.stream, f.role_override, f.task_type) == ("planner", True, "builder", None)


@pytest.mark.parametrize("headers", [{"X-RoleMesh-Role": "two words"},
                                     {"X-RoleMesh-Task-Type": "a b"}])
def test_a_routing_header_with_spaces_is_a_clear_400(headers):
    with pytest.raises(BadRequest, match="one name without spaces"):
        features_from_headers("m", False, headers)


def test_odd_shapes_do_not_crash_the_reader():
    for body in ({"messages": "nope"}, {"messages": [1, None, {"content": {"x": 1}}]},
                 {"prompt": [1, 2, 3]}, {"metadata": "x"}, {"input": [{"role": "user"}]}):
        assert feats(body).prompt_tokens >= 0


# -- generated bodies ----------------------------------------------------------------------

text_part = st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=200))
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:,x"}}
image_part = st.just(IMAGE_PART)
content = st.one_of(st.text(max_size=300), st.lists(st.one_of(text_part, image_part),
                                                     max_size=4))
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": content})


@settings(max_examples=300, deadline=None)
@given(st.lists(message, max_size=6))
def test_images_are_seen_exactly_when_a_message_has_an_image_part(messages):
    has = any(isinstance(m["content"], list) and IMAGE_PART in m["content"] for m in messages)
    assert feats({"messages": messages}).has_images == has


@settings(max_examples=300, deadline=None)
@given(st.lists(message, max_size=6), st.text(min_size=1, max_size=500))
def test_more_text_never_makes_a_smaller_prompt_estimate(messages, extra):
    before = feats({"messages": messages}).prompt_tokens
    after = feats({"messages": [*messages, {"role": "user", "content": extra}]})
    assert after.prompt_tokens > before
    assert after.last_user_text == extra
