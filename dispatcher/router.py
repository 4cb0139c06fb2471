"""From a request's `model` to a device: resolve the name, build views, run the decision.

`choose()` (rolemesh.decision) makes the decision; this module feeds it the registry's
current view and turns a decision without a winner into the error the client gets.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from dispatcher.registry import Key, Registry
from dispatcher.roles import Catalog, Resolution, build_catalog
from dispatcher.views import ViewMemo, device_views
from rolemesh.decision import Decision, Outcome, Policy, choose
from rolemesh.decision_render import render_decision
from rolemesh.errors import (
    DeviceBusy,
    ModelDoesNotFit,
    ModelNotFound,
    NoNodeAvailable,
    RoleMeshError,
)

MAX_NAMES_IN_ERROR = 40


class Router:
    def __init__(self, registry: Registry, aliases: Mapping[str, str], policy: Policy) -> None:
        self.registry = registry
        self.aliases = dict(aliases)
        self.policy = policy
        self._catalogs: dict[bool, tuple[int, Catalog]] = {}
        self._memo: ViewMemo = {}  # each device's last DeviceView (see views.device_views)
        self._memo_version = -1

    def catalog(self, *, up_only: bool = False) -> Catalog:
        """What the cluster serves (every known node, or only those up), cached per change."""
        version = self.registry.version
        cached = self._catalogs.get(up_only)
        if cached is not None and cached[0] == version:
            return cached[1]
        nodes = self.registry.snapshot().nodes.values()
        catalog = build_catalog(nodes, self.aliases, up_only=up_only)
        self._catalogs[up_only] = (version, catalog)
        return catalog

    def resolve(self, name: str) -> Resolution:
        resolution = self.catalog().resolve(name)
        if resolution is None:
            raise ModelNotFound(self._not_served(name))
        return resolution

    def decide(self, resolution: Resolution, exclude: Collection[Key] = (),
               held_ahead: int = 0) -> Decision:
        if self._memo_version != self.registry.version:  # forget devices that went away
            self._memo.clear()
            self._memo_version = self.registry.version
        views = device_views(self.registry.snapshot(), resolution.node_ids, exclude, self._memo)
        return choose(resolution.model_ids, views, self.policy, held_ahead,
                      measured=self.registry.service.means(resolution.model_ids))

    def error_for(self, decision: Decision, name: str) -> RoleMeshError:
        """The error a client gets for a decision without a winner."""
        retry_after_s = decision.retry_after_s or self.policy.busy_retry_after_s
        match decision.outcome:
            case Outcome.NO_CANDIDATES:
                return ModelNotFound(self._not_served(name))
            case Outcome.FITS_NOWHERE:
                usable = (int(decision.largest_device_mb * self.policy.memory_safety_margin)
                          if decision.largest_device_mb is not None else None)
                return ModelDoesNotFit(
                    f"{name!r} does not fit any device: {decision.explain()} (with the "
                    f"{self.policy.memory_safety_margin:g} safety margin, {usable} MB usable)")
            case Outcome.ALL_DOWN:
                return NoNodeAvailable(f"{name!r}: {decision.explain()}",
                                       retry_after_s=retry_after_s)
            case _:
                return DeviceBusy(f"{name!r}: {decision.explain()}", retry_after_s=retry_after_s)

    def explain(self, name: str) -> dict[str, Any]:
        """`/v1/route`: the decision a request for `name` would get now, and why."""
        resolution = self.catalog().resolve(name)
        if resolution is None:
            decision = choose((name,), [], self.policy)
            error: RoleMeshError | None = ModelNotFound(self._not_served(name))
        else:
            decision = self.decide(resolution)
            error = None if decision.winner is not None else self.error_for(decision, name)
        rendered = render_decision(decision)
        self._add_memory(rendered)
        return {
            "model": name,
            "kind": resolution.kind.value if resolution else None,
            **rendered,
            "error": ({"status": error.status, **error.body()["error"]}
                      if error is not None else None),
        }

    def _add_memory(self, rendered: dict[str, Any]) -> None:
        """Each candidate's memory: the need by component (weights on the device, KV cache,
        compute buffer, projector, weights in host RAM), against the device's total x margin
        and what is free now, and the node's host RAM."""
        nodes = self.registry.snapshot().nodes
        margin = self.policy.memory_safety_margin
        for c in rendered["candidates"]:
            node = nodes.get(c["node_id"])
            status = next((m for m in node.models if m.model_id == c["model_id"]),
                          None) if node is not None else None
            if node is None or status is None:
                continue
            total = c.get("memory_total_mb")
            c["memory"] = {
                "source": status.memory_source.value,
                "breakdown": status.memory_breakdown,
                "need_on_device_mb": c.get("memory_need_mb"),
                "usable_mb": int(total * margin) if total is not None else None,
                "room_now_mb": c.get("memory_free_mb"),
                "host_need_mb": status.host_memory_need_mb,
                "host_available_mb": node.host_memory_available_mb,
                "allow_disk_paging": status.allow_disk_paging,
            }

    def _not_served(self, name: str) -> str:
        names = self.catalog(up_only=True).names()
        if not names:
            return f"model or role {name!r} is not served: no node is registered and up"
        shown = ", ".join(names[:MAX_NAMES_IN_ERROR])
        more = f" and {len(names) - MAX_NAMES_IN_ERROR} more" if len(names) > \
            MAX_NAMES_IN_ERROR else ""
        hint = ""
        target = self.aliases.get(name)
        if target is not None:
            hint = f" (it is an alias of {target!r}, which no node serves)"
        return (f"model or role {name!r} is not served by any node{hint}; the cluster "
                f"serves: {shown}{more}")
