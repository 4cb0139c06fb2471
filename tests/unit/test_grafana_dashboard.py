"""docs/grafana-dashboard.json asks only for series the services export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dispatcher.metrics import Metrics
from dispatcher.registry import Registry
from node_agent.metrics import AgentMetrics

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def exported() -> set[str]:
    dispatcher = Metrics(Registry(timeout_s=3, forget_s=12, clock=lambda: 0.0))
    agent = AgentMetrics()
    agent.read_devices_from(lambda: ("n", [{"device_id": "gpu:0", "memory_total_mb": 1,
                                            "in_flight": 0, "pending": 0}]))
    names = set()
    for registry in (dispatcher.registry, agent.registry):
        names |= {family.name for family in registry.collect()}
    return names


def test_every_series_the_dashboard_plots_is_exported():
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    wanted = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for found in re.findall(r"rolemesh_[a-z_]+", target["expr"]):
                name = found
                for suffix in SUFFIXES:
                    name = name.removesuffix(suffix)
                wanted.add(name)
    assert len(wanted) >= 15
    assert wanted - exported() == set()
