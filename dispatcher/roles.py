"""What the cluster serves, and what a request's `model` names: pure functions of data.

A request's `model` is, in this order: a model id some node serves, a role some node's
model carries, or an alias from the dispatcher's config (`aliases:`) naming a role or model
id. The routing table (rolemesh.routing_rules) picks the name first when it has rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from dispatcher.registry import NodeRecord
from rolemesh.api import NodeState, OpenAIModel, OpenAIModelList


class NameKind(StrEnum):
    MODEL = "model"
    ROLE = "role"
    ALIAS = "alias"


@dataclass(frozen=True, slots=True)
class Resolution:
    name: str
    kind: NameKind
    model_ids: tuple[str, ...]
    node_ids: tuple[str, ...]  # the nodes that serve at least one of model_ids


@dataclass(frozen=True)
class Catalog:
    model_nodes: Mapping[str, tuple[str, ...]]  # model id -> node ids that serve it
    model_roles: Mapping[str, tuple[str, ...]]  # model id -> its roles (on any node)
    role_models: Mapping[str, tuple[str, ...]]  # role -> model ids that carry it
    aliases: Mapping[str, str]  # alias -> role or model id (from the config)
    # model id -> its context window in tokens (the smallest any node reports); None: unknown
    model_ctx: Mapping[str, int | None] = field(default_factory=dict)

    def resolve(self, name: str) -> Resolution | None:
        if name in self.model_nodes:
            return Resolution(name, NameKind.MODEL, (name,), self.model_nodes[name])
        models = self.role_models.get(name)
        if models is not None:
            return Resolution(name, NameKind.ROLE, models, self._nodes_of(models))
        target = self.aliases.get(name)
        if target is not None:
            inner = self.resolve(target)
            if inner is not None and inner.kind is not NameKind.ALIAS:
                return Resolution(name, NameKind.ALIAS, inner.model_ids, inner.node_ids)
        return None

    def restrict(self, resolution: Resolution, model_ids: Iterable[str]) -> Resolution:
        """The same name, limited to some of its models (those with room for the prompt)."""
        kept = tuple(m for m in resolution.model_ids if m in set(model_ids))
        return Resolution(resolution.name, resolution.kind, kept, self._nodes_of(kept))

    def servable_names(self) -> frozenset[str]:
        """Every name that resolves now: model ids, roles, aliases."""
        return frozenset(self.names())

    def names(self) -> list[str]:
        """Every name a request can use now: model ids, roles, aliases that resolve."""
        out = sorted(self.model_nodes) + sorted(self.role_models)
        out += sorted(a for a in self.aliases if self.resolve(a) is not None)
        return list(dict.fromkeys(out))

    def _nodes_of(self, model_ids: Iterable[str]) -> tuple[str, ...]:
        nodes: dict[str, None] = {}
        for m in model_ids:
            nodes.update(dict.fromkeys(self.model_nodes.get(m, ())))
        return tuple(nodes)


def build_catalog(nodes: Iterable[NodeRecord], aliases: Mapping[str, str], *,
                  up_only: bool = False) -> Catalog:
    model_nodes: dict[str, list[str]] = {}
    model_roles: dict[str, dict[str, None]] = {}
    role_models: dict[str, dict[str, None]] = {}
    model_ctx: dict[str, int | None] = {}
    for node in sorted(nodes, key=lambda n: n.node_id):
        if up_only and node.state is not NodeState.UP:
            continue
        if not node.device_ids:
            continue  # a node without devices serves nothing
        for model in node.models:
            model_nodes.setdefault(model.model_id, []).append(node.node_id)
            ctx = model.ctx_size
            if model.model_id not in model_ctx:
                model_ctx[model.model_id] = ctx
            elif ctx is not None:
                seen = model_ctx[model.model_id]
                model_ctx[model.model_id] = ctx if seen is None else min(seen, ctx)
            roles = model_roles.setdefault(model.model_id, {})
            for role in model.roles:
                roles[role] = None
                role_models.setdefault(role, {})[model.model_id] = None
    return Catalog(
        model_nodes={m: tuple(ns) for m, ns in model_nodes.items()},
        model_roles={m: tuple(sorted(rs)) for m, rs in model_roles.items()},
        role_models={r: tuple(sorted(ms)) for r, ms in role_models.items()},
        aliases=dict(aliases), model_ctx=model_ctx)


def model_list(catalog: Catalog, task_types: Mapping[str, str] | None = None
               ) -> OpenAIModelList:
    """OpenAI's list shape: every model id, role and alias the catalog can serve, and the
    routing table's task types whose role it serves (a request's `model` may name one)."""
    data = [OpenAIModel(id=m, roles=list(catalog.model_roles.get(m, ())), kind="model")
            for m in sorted(catalog.model_nodes)]
    data += [OpenAIModel(id=r, kind="role", models=list(ms))
             for r, ms in sorted(catalog.role_models.items())]
    for alias in sorted(catalog.aliases):
        resolved = catalog.resolve(alias)
        if resolved is not None and resolved.kind is NameKind.ALIAS:
            data.append(OpenAIModel(id=alias, kind="alias", models=list(resolved.model_ids),
                                    alias_of=catalog.aliases[alias]))
    listed = {entry.id for entry in data}
    for task_type, role in sorted((task_types or {}).items()):
        resolved = catalog.resolve(role)
        if resolved is not None and task_type not in listed:
            data.append(OpenAIModel(id=task_type, kind="task_type", role=role,
                                    models=list(resolved.model_ids)))
    return OpenAIModelList(data=data)
