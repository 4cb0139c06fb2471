"""The routing rules as a pure function: tables of cases, then generated feature sets."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rolemesh.errors import BadRequest
from rolemesh.request_features import RequestFeatures
from rolemesh.routing_rules import (
    RoutingTable,
    TaskTypeFound,
    TaskTypeSource,
    choose_route,
    find_task_type,
    fit_context,
    parse_classifier_answer,
    unknown_roles,
)

TABLE = RoutingTable.model_validate({
    "task_types": {"planning": "architect", "design": "architect", "audit": "architect",
                   "implementation": "builder", "infra": "operator", "email": "assistant"},
    "keyword_rules": [
        {"name": "kubernetes", "pattern": r"\b(kubectl|helm|k8s)\b", "task_type": "infra"},
        {"pattern": "^audit", "task_type": "audit", "where": "last_user"},
        {"pattern": "you write emails", "task_type": "email", "where": "system"},
    ],
    "content_rules": [
        {"name": "images", "when": {"images": True}, "role": "vision"},
        {"name": "realtime", "when": {"latency": "realtime"}, "role": "fast"},
        {"name": "long", "when": {"min_prompt_tokens": 8000}, "role": "large"},
        {"name": "short_untyped", "when": {"max_prompt_tokens": 50, "has_task_type": False},
         "role": "fast"},
    ],
    "fallbacks": {"architect": ["builder"], "vision": ["large"]},
})
MODEL_IDS = frozenset({"qwen-72b", "qwen-7b", "llava"})
SERVED = MODEL_IDS | {"architect", "builder", "operator", "assistant", "vision", "fast",
                      "large", "planner"}


def f(model="architect", **kw) -> RequestFeatures:
    return RequestFeatures(model=model, **{"prompt_tokens": 100, **kw})


def route(feat: RequestFeatures, table: RoutingTable = TABLE, inferred=None):
    return choose_route(feat, table, model_ids=MODEL_IDS, served=SERVED,
                        task=find_task_type(feat, table), inferred=inferred)


@pytest.mark.parametrize(("features", "target", "rule"), [
    (f(role_override="builder", has_images=True), "builder", "override:header"),
    (f("qwen-7b", has_images=True, task_type="infra"), "qwen-7b", "override:model"),
    (f(has_images=True, task_type="infra"), "vision", "content:images"),
    (f(latency="realtime", prompt_tokens=9000), "fast", "content:realtime"),
    (f(prompt_tokens=9000, task_type="email"), "large", "content:long"),
    (f(prompt_tokens=10), "fast", "content:short_untyped"),
    (f(prompt_tokens=10, task_type="email"), "assistant", "task_type:email"),
    (f(task_type="infra"), "operator", "task_type:infra"),
    (f("planning"), "architect", "task_type:planning"),
    (f("builder", last_user_text="kubectl apply -f x.yaml"), "operator", "task_type:infra"),
    (f("builder", last_user_text="AUDIT this diff"), "architect", "task_type:audit"),
    (f("builder", system_text="You write emails"), "assistant", "task_type:email"),
    (f("builder", last_user_text="you write emails"), "builder", "name"),  # system only
    (f("builder"), "builder", "name"),
    (f("planner"), "planner", "name"),
    (f("nobody-serves-this"), "nobody-serves-this", "name"),
])
def test_the_first_matching_rule_decides(features, target, rule):
    choice = route(features)
    assert (choice.target, choice.rule) == (target, rule)


def test_the_choice_says_how_the_task_type_was_found():
    assert route(f(task_type="infra")).task == TaskTypeFound("infra", TaskTypeSource.HEADER)
    assert route(f(task_type="infra", task_type_in_body=True)).task.source == \
        TaskTypeSource.METADATA
    assert route(f("planning")).task.source == TaskTypeSource.MODEL
    found = route(f("builder", last_user_text="helm upgrade")).task
    assert (found.source, found.rule) == (TaskTypeSource.KEYWORD, "kubernetes")
    assert route(f("builder")).task is None


def test_fallbacks_of_the_target_come_with_the_choice():
    assert route(f("planning")).fallbacks == ("builder",)
    assert route(f(has_images=True)).fallbacks == ("large",)
    assert route(f("builder")).fallbacks == ()


def test_an_unknown_task_type_is_a_400_naming_the_known_ones():
    with pytest.raises(BadRequest, match=r"'cooking'.*known task types: audit, design"):
        route(f(task_type="cooking"))


def test_the_default_task_type_applies_only_to_a_name_that_is_not_served():
    table = TABLE.model_copy(update={"default_task_type": "implementation",
                                     "content_rules": []})
    choice = route(f("auto"), table)
    assert (choice.target, choice.rule, choice.task.source) == \
        ("builder", "task_type:implementation", TaskTypeSource.DEFAULT)
    assert route(f("assistant"), table).target == "assistant"


def test_with_a_classifier_an_unserved_name_asks_for_a_task_type_then_uses_its_answer():
    table = RoutingTable.model_validate({**TABLE.model_dump(), "content_rules": [],
                                         "classifier": {"role": "assistant"}})
    first = route(f("auto"), table)
    assert first.wants_task_type
    answer = TaskTypeFound("design", TaskTypeSource.CLASSIFIER, "assistant")
    second = route(f("auto"), table, inferred=answer)
    assert (second.target, second.task, second.wants_task_type) == ("architect", answer, False)
    assert not route(f("builder"), table).wants_task_type  # a served role needs no classifier


@pytest.mark.parametrize(("text", "expected"), [
    ("infra", "infra"), ("  Infra.", "infra"), ('"planning"', "planning"),
    ("The task type is: email", "email"), ("infra or planning", None), ("cooking", None),
    ("", None),
])
def test_a_classifier_answer_is_one_task_type_or_nothing(text, expected):
    assert parse_classifier_answer(text, list(TABLE.task_types)) == expected


def test_roles_the_table_names_must_be_served_or_declared():
    assert unknown_roles(TABLE, SERVED) == []
    assert unknown_roles(TABLE, SERVED - {"vision", "builder"}) == ["builder", "vision"]
    assert unknown_roles(TABLE, SERVED - {"vision"}, declared=["vision"]) == []


def test_the_context_fit_picks_the_first_target_with_room():
    models = {"builder": ["qwen-7b"], "large": ["qwen-72b", "qwen-72b-long"]}
    ctx = {"qwen-7b": 4096, "qwen-72b": 32768, "qwen-72b-long": 131072}
    assert fit_context(1000, ["builder", "large"], models, ctx).target == "builder"
    fit = fit_context(50000, ["builder", "large"], models, ctx)
    assert (fit.target, fit.model_ids) == ("large", ("qwen-72b-long",))
    none = fit_context(500000, ["builder", "large"], models, ctx)
    assert (none.target, none.largest_ctx) == (None, 131072)
    assert fit_context(10**9, ["x"], {"x": ["m"]}, {"m": None}).target == "x"  # unknown: try


# -- generated feature sets ----------------------------------------------------------------

names = st.sampled_from(["architect", "builder", "planning", "qwen-7b", "auto", "infra",
                         "vision"])
features = st.builds(
    RequestFeatures,
    model=names,
    has_images=st.booleans(),
    has_tools=st.booleans(),
    prompt_tokens=st.integers(0, 200000),
    task_type=st.one_of(st.none(), st.sampled_from(sorted(TABLE.task_types))),
    latency=st.one_of(st.none(), st.sampled_from(["realtime", "batch"])),
    role_override=st.one_of(st.none(), st.sampled_from(["builder", "large"])),
    system_text=st.sampled_from(["", "You write emails", "be helpful"]),
    last_user_text=st.sampled_from(["", "kubectl get pods", "audit it", "hello"]),
)


@settings(max_examples=400, deadline=None)
@given(features)
def test_every_request_gets_one_target_and_a_rule_that_explains_it(feat):
    choice = route(feat)
    assert choice.target
    kind, _, detail = choice.rule.partition(":")
    assert kind in {"override", "content", "task_type", "name"}
    if feat.role_override is not None:
        assert (choice.target, choice.rule) == (feat.role_override, "override:header")
    elif feat.model in MODEL_IDS:
        assert (choice.target, choice.rule) == (feat.model, "override:model")
    elif kind == "content":
        rule = next(r for r in TABLE.content_rules if r.name == detail)
        assert choice.target == rule.role
        task = find_task_type(feat, TABLE)
        assert rule.when.matches(feat, task.task_type if task else None)
        earlier = TABLE.content_rules[:TABLE.content_rules.index(rule)]
        assert not any(r.when.matches(feat, task.task_type if task else None) for r in earlier)
    elif kind == "task_type":
        assert choice.task is not None
        assert choice.task.task_type == detail
        assert choice.target == TABLE.task_types[detail]
    else:
        assert choice.target == feat.model
    assert choice.fallbacks == tuple(TABLE.fallbacks.get(choice.target, ()))


@settings(max_examples=200, deadline=None)
@given(features)
def test_an_image_request_never_reaches_a_text_tier_unless_overridden(feat):
    feat = dataclasses.replace(feat, has_images=True)
    choice = route(feat)
    assert choice.target == "vision" or choice.rule.startswith("override:")


@settings(max_examples=200, deadline=None)
@given(features, st.sampled_from(["kubectl delete ns x", "helm install"]))
def test_kubernetes_work_never_goes_to_the_builder_by_the_table(feat, text):
    feat = dataclasses.replace(feat, last_user_text=text, task_type=None, role_override=None)
    choice = route(feat)
    if not choice.rule.startswith(("override:", "content:")) and feat.model not in TABLE.task_types:
        assert choice.target == "operator"


@settings(max_examples=200, deadline=None)
@given(features)
def test_the_rules_are_a_function_of_the_features_alone(feat):
    assert route(feat) == route(dataclasses.replace(feat))


def test_the_worked_example_in_docs_routing_md_does_what_the_doc_says():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "routing.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S)
                 if b.startswith("routing:"))
    table = RoutingTable.model_validate(yaml.safe_load(block)["routing"])
    models = frozenset({"qwen-72b", "coder-14b", "qwen-3b", "llava-7b"})
    served = models | {"architect", "builder", "operator", "vision"}

    def goes(feat: RequestFeatures) -> tuple[str, str]:
        c = choose_route(feat, table, model_ids=models, served=served,
                         task=find_task_type(feat, table))
        return c.target, c.rule

    assert goes(f("planning")) == ("architect", "task_type:planning")
    assert goes(f("builder", task_type="audit")) == ("architect", "task_type:audit")
    assert goes(f("builder", last_user_text="kubectl rollout restart deploy/api")) == \
        ("operator", "task_type:infra")
    assert goes(f("builder", last_user_text="write the parser")) == ("builder", "name")
    assert goes(f("builder", has_images=True)) == ("vision", "content:images")
    assert goes(f("builder", latency="realtime")) == ("operator", "content:realtime")
    assert goes(f("operator", prompt_tokens=20000)) == ("architect", "content:long_prompt")
    assert goes(f("coder-14b", has_images=True)) == ("coder-14b", "override:model")
    assert goes(f("builder", role_override="architect")) == ("architect", "override:header")
    assert table.fallbacks["architect"] == ["builder"]
