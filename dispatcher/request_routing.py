"""From a request to the names it may go to: the routing table's rules, then fallbacks.

The forwarder asks `plan()` before any decision. The body is walked for features only when
something needs them: content or keyword rules, a `model` that is not a plain model id /
role / alias (a task type, or a name for the classifier), or a target whose models report
their context size (the context-window fallback needs the prompt's size).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from dispatcher.classifier import Classifier
from dispatcher.roles import Catalog, Resolution
from dispatcher.router import Router
from dispatcher.routing_table import RoutingTableStore
from rolemesh import headers
from rolemesh.errors import (
    BadRequest,
    ContextTooLong,
    DeviceBusy,
    ModelDoesNotFit,
    ModelNotFound,
    ModelNotReady,
    NoNodeAvailable,
    RoleMeshError,
)
from rolemesh.openai_body import OpenAIRequestHead
from rolemesh.request_features import (
    RequestFeatures,
    features_from_body,
    features_from_headers,
)
from rolemesh.routing_rules import (
    RouteChoice,
    RoutingTable,
    choose_route,
    find_task_type,
    fit_context,
)

log = structlog.get_logger("dispatcher.request_routing")

# Headers for the client's answer: the rule that fired, the task type, any fallback.
ROUTE_HEADERS_KEY = web.RequestKey("rolemesh_route_headers", dict)

# What makes the dispatcher try a fallback: the target cannot take the request now.
FALLBACK_ERRORS = (DeviceBusy, ModelNotReady, NoNodeAvailable, ModelDoesNotFit, ModelNotFound)


def with_model(data: Mapping[str, Any], model_id: str) -> bytes:
    """The body with `model` naming the model that will answer (it echoes it back)."""
    return json.dumps({**data, "model": model_id}, separators=(",", ":")).encode()


@dataclass
class RoutePlan:
    choice: RouteChoice
    features: RequestFeatures
    resolutions: list[Resolution]  # the target (its models with room), then its fallbacks
    headers: dict[str, str] = field(default_factory=dict)
    name_is_known: bool = True

    @property
    def label(self) -> str:
        """The name for metrics: the client's when it is served or a task type, else the
        target's (a name a client made up must not become a label)."""
        return self.features.model if self.name_is_known else self.resolutions[0].name

    def fell_back(self, index: int, err: RoleMeshError) -> None:
        came, goes = self.resolutions[index].name, self.resolutions[index + 1].name
        self.headers[headers.FALLBACK] = f"{came}->{goes} ({err.code})"
        self.headers[headers.TARGET] = goes


def falls_back(err: RoleMeshError) -> bool:
    return isinstance(err, FALLBACK_ERRORS)


class RequestRouting:
    def __init__(self, store: RoutingTableStore, router: Router,
                 classifier: Classifier | None = None) -> None:
        self.store = store
        self.router = router
        self.classifier = classifier
        self._served: tuple[Catalog, frozenset[str]] | None = None

    def served(self, catalog: Catalog) -> frozenset[str]:
        if self._served is None or self._served[0] is not catalog:
            self._served = (catalog, catalog.servable_names())
        return self._served[1]

    def features(self, head: OpenAIRequestHead, h: Mapping[str, str],
                 table: RoutingTable, catalog: Catalog) -> RequestFeatures:
        plain = (head.model in catalog.model_nodes or head.model in catalog.role_models or
                 head.model in catalog.aliases) and head.model not in table.task_types
        if table.needs_content or not plain:
            return features_from_body(head.data, head.model, head.stream, h,
                                      chars_per_token=table.chars_per_token)
        return features_from_headers(head.model, head.stream, h)

    async def choose(self, f: RequestFeatures, table: RoutingTable, catalog: Catalog
                     ) -> RouteChoice:
        task = find_task_type(f, table)
        served = self.served(catalog)
        choice = choose_route(f, table, model_ids=catalog.model_nodes, served=served, task=task)
        if choice.wants_task_type and self.classifier is not None:
            inferred = await self.classifier.classify(f, table)
            choice = choose_route(f, table, model_ids=catalog.model_nodes, served=served,
                                  task=task, inferred=inferred)
        return choice

    async def plan(self, head: OpenAIRequestHead, h: Mapping[str, str]) -> RoutePlan:
        table = self.store.table
        catalog = self.router.catalog()
        f = self.features(head, h, table, catalog)
        choice = await self.choose(f, table, catalog)
        out = {headers.RULE: choice.rule, headers.TARGET: choice.target}
        if choice.task is not None:
            out[headers.TASK_TYPE] = choice.task.task_type
            out[headers.TASK_TYPE_SOURCE] = choice.task.source.value
        names = [choice.target, *choice.fallbacks]
        resolved = [(n, catalog.resolve(n)) for n in names]
        usable = [(n, r) for n, r in resolved if r is not None]
        if not usable:
            try:
                self.router.resolve(choice.target)  # the usual 404, naming what is served
            except RoleMeshError as err:
                err.headers.update(out)
                raise
        if usable[0][0] != choice.target:
            out[headers.FALLBACK] = f"{choice.target}->{usable[0][0]} (model_not_found)"
            out[headers.TARGET] = usable[0][0]
        resolutions = [r for _, r in usable if r is not None]
        resolutions = self._context_fit(head, h, f, choice, table, catalog, resolutions, out)
        known = head.model in self.served(catalog) or head.model in table.task_types
        if choice.rule != "name" or headers.FALLBACK in out:
            log.info("request.rule", rule=choice.rule, target=out[headers.TARGET],
                     task_type=out.get(headers.TASK_TYPE),
                     task_type_source=out.get(headers.TASK_TYPE_SOURCE),
                     fallback=out.get(headers.FALLBACK))
        return RoutePlan(choice, f, resolutions, out, known)

    def _context_fit(self, head: OpenAIRequestHead, h: Mapping[str, str],
                     f: RequestFeatures, choice: RouteChoice, table: RoutingTable,
                     catalog: Catalog,
                     resolutions: list[Resolution], out: dict[str, str]) -> list[Resolution]:
        """Drop models whose context cannot hold the prompt; move on to a roomier role."""
        ctx = catalog.model_ctx
        if not any(ctx.get(m) for r in resolutions for m in r.model_ids):
            return resolutions
        if f.prompt_tokens == 0 and not table.needs_content:
            f = features_from_body(head.data, head.model, head.stream, h,
                                   chars_per_token=table.chars_per_token)
        candidates = [r.name for r in resolutions]
        if choice.rule.startswith("override:"):
            candidates = candidates[:1]  # the client chose: a clear 400 rather than another
        else:
            candidates += [n for n in table.named_roles() if n not in candidates]
        by_name = {r.name: r for r in resolutions}
        for n in candidates:
            if n not in by_name and (r := catalog.resolve(n)) is not None:
                by_name[n] = r
        fit = fit_context(f.prompt_tokens, [n for n in candidates if n in by_name],
                          {n: r.model_ids for n, r in by_name.items()}, ctx)
        if fit.target is None:
            largest = fit.largest_ctx
            raise ContextTooLong(
                f"the prompt is about {f.prompt_tokens} tokens; the largest context "
                f"available for {resolutions[0].name!r} and its fallbacks is {largest} "
                "tokens", headers=out)
        first = catalog.restrict(by_name[fit.target], fit.model_ids)
        if fit.target != resolutions[0].name:
            out[headers.FALLBACK] = f"{resolutions[0].name}->{fit.target} (context_length)"
            out[headers.TARGET] = fit.target
            return [first]
        rest = []  # the fallbacks for busy / fits-nowhere: only their models with room
        for r in resolutions[1:]:
            roomy = fit_context(f.prompt_tokens, [r.name], {r.name: r.model_ids}, ctx)
            if roomy.target is not None:
                rest.append(catalog.restrict(r, roomy.model_ids))
        return [first, *rest]

    async def explain(self, f: RequestFeatures) -> dict[str, Any]:
        """The routing part of /v1/route: the rule that fires for these features."""
        table = self.store.table
        catalog = self.router.catalog()
        choice = await self.choose(f, table, catalog)
        return {"target": choice.target, "rule": choice.rule,
                "task_type": choice.task.task_type if choice.task else None,
                "task_type_source": choice.task.source.value if choice.task else None,
                "fallbacks": list(choice.fallbacks), "table_version": self.store.version,
                "prompt_tokens": f.prompt_tokens}


def features_from_query(q: Mapping[str, str]) -> RequestFeatures:
    """/v1/route?model=..&task_type=..&role=..&latency=..&images=1&tools=1&prompt_tokens=N
    &text=..&system=..: the features a request with those traits would have."""
    def flag(name: str) -> bool:
        return q.get(name, "").lower() in ("1", "true", "yes")

    try:
        tokens = int(q.get("prompt_tokens", "0"))
    except ValueError:
        tokens = -1
    if tokens < 0:
        raise BadRequest("prompt_tokens must be a whole number >= 0")
    h = {k: v for k, v in ((headers.TASK_TYPE, q.get("task_type")), (headers.ROLE, q.get("role")),
                           (headers.LATENCY, q.get("latency"))) if v}
    base = features_from_headers(q.get("model", ""), False, h)
    return RequestFeatures(
        model=base.model, has_images=flag("images"), has_tools=flag("tools"),
        prompt_tokens=tokens, task_type=base.task_type, latency=base.latency,
        role_override=base.role_override, system_text=q.get("system", ""),
        first_user_text=q.get("text", ""), last_user_text=q.get("text", ""))
