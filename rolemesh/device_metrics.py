"""Device gauges both services export: memory (total, used, charged MB) and utilisation.

Read from device reports as they are on the wire, today's (`DeviceStatus`) or schema v2
(which adds `memory_charged_mb`), as objects or as dicts; an unknown figure is left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

MEMORY_FIGURES = ("total", "used", "charged")


def figure(status: Any, name: str) -> Any:
    if isinstance(status, dict):
        return status.get(name)
    return getattr(status, name, None)


def device_memory_families(prefix: str, devices: Iterable[tuple[str, str, Any]]
                           ) -> Iterator[Metric]:
    """`devices`: (node id, device id, report) triples."""
    families = {name: GaugeMetricFamily(f"{prefix}_device_memory_{name}_mb",
                                        f"Device memory {name} (MB), as last reported",
                                        labels=["node", "device"])
                for name in MEMORY_FIGURES}
    util = GaugeMetricFamily(f"{prefix}_device_utilization_pct",
                             "Device utilisation in percent (cuda: from NVML)",
                             labels=["node", "device"])
    for node_id, device_id, status in devices:
        for name in MEMORY_FIGURES:
            value = figure(status, f"memory_{name}_mb")
            if value is not None:
                families[name].add_metric([node_id, device_id], value)
        pct = figure(status, "utilization_pct")
        if pct is not None:
            util.add_metric([node_id, device_id], pct)
    yield from families.values()
    yield util
