"""What a request's `model` names: model ids, roles, aliases; and the /v1/models list."""

from __future__ import annotations

from dispatcher.registry import Registry
from dispatcher.roles import NameKind, build_catalog, model_list
from rolemesh.api import DeviceStatus, ModelStatus, NodeInventory


def node(registry: Registry, node_id: str, served: dict[str, list[str]],
         devices: int = 1) -> None:
    registry.register(NodeInventory(
        node_id=node_id, url=f"http://{node_id}:8081", backend="cuda", seq=1,
        devices=[DeviceStatus(device_id=f"gpu:{i}", name="GPU", backend="cuda",
                              memory_total_mb=24000, memory_used_mb=0, memory_free_mb=24000)
                 for i in range(devices)],
        models=[ModelStatus(model_id=m, roles=roles, file_size_mb=1, memory_need_mb=1)
                for m, roles in served.items()]))


def cluster() -> Registry:
    registry = Registry(timeout_s=15, forget_s=60, clock=lambda: 0.0)
    node(registry, "node-a", {"qwen-7b": ["planner", "chat"], "coder-7b": ["coder"]})
    node(registry, "node-b", {"llama-8b": ["planner"]})
    return registry


ALIASES = {"planning": "planner", "code": "coder", "fast": "llama-8b", "write": "writer"}


def catalog(registry: Registry | None = None, *, up_only: bool = False):
    registry = registry or cluster()
    return build_catalog(registry.snapshot().nodes.values(), ALIASES, up_only=up_only)


def test_a_model_id_resolves_to_itself_and_the_nodes_that_serve_it():
    r = catalog().resolve("llama-8b")
    assert r is not None
    assert (r.kind, r.model_ids, r.node_ids) == (NameKind.MODEL, ("llama-8b",), ("node-b",))


def test_a_role_resolves_to_every_model_with_it_across_nodes():
    r = catalog().resolve("planner")
    assert r is not None
    assert r.kind is NameKind.ROLE
    assert r.model_ids == ("llama-8b", "qwen-7b")
    assert set(r.node_ids) == {"node-a", "node-b"}


def test_an_alias_resolves_to_what_its_role_or_model_resolves_to():
    c = catalog()
    planning = c.resolve("planning")
    assert planning is not None
    assert planning.kind is NameKind.ALIAS
    assert planning.model_ids == ("llama-8b", "qwen-7b")
    fast = c.resolve("fast")
    assert fast is not None
    assert (fast.kind, fast.model_ids) == (NameKind.ALIAS, ("llama-8b",))


def test_an_alias_of_something_nobody_serves_and_an_unknown_name_resolve_to_nothing():
    c = catalog()
    assert c.resolve("write") is None
    assert c.resolve("nope") is None
    assert c.resolve("") is None


def test_a_model_id_wins_over_a_role_and_a_role_over_an_alias():
    registry = Registry(timeout_s=15, forget_s=60, clock=lambda: 0.0)
    node(registry, "node-a", {"planner": ["chat"], "x-1": ["code"]})
    c = build_catalog(registry.snapshot().nodes.values(), {"code": "planner"})
    r = c.resolve("code")
    assert r is not None
    assert (r.kind, r.model_ids) == (NameKind.ROLE, ("x-1",))
    r = c.resolve("planner")
    assert r is not None
    assert r.kind is NameKind.MODEL


def test_down_nodes_still_resolve_but_are_not_listed_as_served_now():
    registry = cluster()
    registry.mark_down("node-b", why="test")
    assert catalog(registry).resolve("llama-8b") is not None
    assert catalog(registry, up_only=True).resolve("llama-8b") is None
    up = catalog(registry, up_only=True).resolve("planner")
    assert up is not None
    assert up.model_ids == ("qwen-7b",)


def test_a_node_without_devices_serves_nothing():
    registry = Registry(timeout_s=15, forget_s=60, clock=lambda: 0.0)
    node(registry, "node-a", {"m": ["r"]}, devices=0)
    assert catalog(registry).resolve("m") is None


def test_names_lists_models_roles_and_resolvable_aliases():
    assert catalog().names() == ["coder-7b", "llama-8b", "qwen-7b", "chat", "coder",
                                 "planner", "code", "fast", "planning"]


def test_the_model_list_has_every_model_role_and_alias_in_openai_shape():
    listing = model_list(catalog()).model_dump(exclude_none=True)
    assert listing["object"] == "list"
    by_id = {m["id"]: m for m in listing["data"]}
    assert by_id["qwen-7b"]["kind"] == "model"
    assert by_id["qwen-7b"]["roles"] == ["chat", "planner"]
    assert by_id["qwen-7b"]["object"] == "model"
    assert by_id["planner"] == {"id": "planner", "object": "model", "created": 0,
                                "owned_by": "rolemesh", "roles": [], "kind": "role",
                                "models": ["llama-8b", "qwen-7b"]}
    assert by_id["planning"]["kind"] == "alias"
    assert by_id["planning"]["alias_of"] == "planner"
    assert by_id["planning"]["models"] == ["llama-8b", "qwen-7b"]
    assert "write" not in by_id


def test_the_catalog_knows_each_models_context_and_restricts_a_role_to_some_models():
    registry = Registry(timeout_s=15, forget_s=60, clock=lambda: 0.0)
    registry.register(NodeInventory(
        node_id="n", url="http://n:8081", backend="cuda", seq=1,
        devices=[DeviceStatus(device_id="gpu:0", name="GPU", backend="cuda",
                              memory_total_mb=24000, memory_used_mb=0, memory_free_mb=24000)],
        models=[ModelStatus(model_id="short", roles=["chat"], file_size_mb=1, memory_need_mb=1,
                            ctx_size=4096),
                ModelStatus(model_id="long", roles=["chat"], file_size_mb=1, memory_need_mb=1,
                            ctx_size=131072),
                ModelStatus(model_id="unknown", roles=["chat"], file_size_mb=1,
                            memory_need_mb=1)]))
    cat = build_catalog(registry.snapshot().nodes.values(), {})
    assert cat.model_ctx == {"short": 4096, "long": 131072, "unknown": None}
    chat = cat.resolve("chat")
    assert chat is not None
    only = cat.restrict(chat, ["long"])
    assert (only.name, only.model_ids, only.node_ids) == ("chat", ("long",), ("n",))
    assert "chat" in cat.servable_names()
