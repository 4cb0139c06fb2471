"""The cluster file: what hardware the simulation has, which models, and how fast they are.

A model is given either by the node agent's own model fields (`model_id`, `path`, `roles`,
`ctx_size`, `parallel`, ...; with a readable GGUF at `path` its memory need and size come
from the file, as the agent computes them) or by a shorthand (`size_gb`, `memory_need_mb`).
The speed figures (`tokens_per_s`, `prefill_tokens_per_s`, `output_tokens`, `load_s`) are
the simulation's own. Errors read `file: a.b.c: problem`, as for every RoleMesh config.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rolemesh.config_loading import load_config, load_config_file
from rolemesh.cost_model import CostModel

MB_PER_GB = 1024
# Weights plus a KV cache for a modest context: what a shorthand model needs by default.
DEFAULT_OVERHEAD = 1.15

Loads = Literal["warm", "cold"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutputTokens(StrictModel):
    """How long answers are: lognormal with this mean and sigma (0 = always the mean)."""

    mean: float = Field(default=200.0, gt=0)
    sigma: float = Field(default=0.8, ge=0, le=3)
    max: int = Field(default=4096, ge=1)


class SimModel(StrictModel):
    model_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/@+-]+$")
    roles: list[str] = Field(default_factory=list)
    # Node-agent fields the simulation reads (others in `agent` are accepted and ignored).
    path: Path | None = None
    ctx_size: int | None = Field(default=None, ge=16)
    parallel: int = Field(default=1, ge=1, le=256)
    # The shorthand, or what the GGUF says.
    size_gb: float | None = Field(default=None, gt=0)
    memory_need_mb: int | None = Field(default=None, gt=0)
    # Speed, on a device of speed 1.0.
    load_s: float | None = Field(default=None, ge=0)  # overrides base_s + slope x size
    tokens_per_s: float = Field(default=50.0, gt=0)  # decode, shared by parallel slots
    prefill_tokens_per_s: float = Field(default=1500.0, gt=0)
    prompt_tokens: int = Field(default=400, ge=1)  # when a trace does not say
    output_tokens: OutputTokens = Field(default_factory=OutputTokens)
    agent: dict[str, Any] = Field(default_factory=dict)  # other node-agent keys: kept, unused

    @model_validator(mode="before")
    @classmethod
    def _agent_fields(cls, data: Any) -> Any:
        """Node-agent model keys the simulation has no use for go to `agent`, not an error."""
        if not isinstance(data, dict):
            return data
        from node_agent.config import ModelConfig

        own = set(cls.model_fields)
        agent_keys = set(ModelConfig.model_fields) - own
        moved = {k: v for k, v in data.items() if k in agent_keys}
        if not moved:
            return data
        return {**{k: v for k, v in data.items() if k not in moved},
                "agent": {**data.get("agent", {}), **moved}}

    @model_validator(mode="after")
    def _sized(self) -> SimModel:
        if self.size_gb is not None and self.memory_need_mb is not None:
            return self
        if self.path is not None and self.path.is_file():  # relative: to the working dir
            self._from_gguf(self.path)
            return self
        if self.size_gb is None and self.memory_need_mb is None:
            raise ValueError(f"{self.model_id}: give size_gb or memory_need_mb (or a path to "
                             "a readable GGUF)")
        return self

    def _from_gguf(self, path: Path) -> None:
        from rolemesh.memory_estimate import estimate_memory_mb, read_gguf_facts

        facts = read_gguf_facts(path)
        size_gb = self.size_gb or facts.file_size_bytes / (1024 ** 3)
        need = self.memory_need_mb or estimate_memory_mb(facts, self.ctx_size, self.parallel)
        object.__setattr__(self, "size_gb", size_gb)
        object.__setattr__(self, "memory_need_mb", need)

    @property
    def need_mb(self) -> int:
        if self.memory_need_mb is not None:
            return self.memory_need_mb
        assert self.size_gb is not None
        return math.ceil(self.size_gb * MB_PER_GB * DEFAULT_OVERHEAD)

    @property
    def gb(self) -> float:
        if self.size_gb is not None:
            return self.size_gb
        return self.need_mb / MB_PER_GB / DEFAULT_OVERHEAD


class LoadTime(StrictModel):
    """Seconds to load a model: base_s + slope x size in GB (warm page cache, or cold disk)."""

    base_s: float = Field(default=2.0, ge=0)
    warm_s_per_gb: float = Field(default=0.3, ge=0)
    cold_s_per_gb: float = Field(default=2.5, ge=0)


class SimDevice(StrictModel):
    device_id: str = Field(min_length=1)
    memory_mb: int | None = Field(default=None, gt=0)  # None: unknown (a CPU: anything fits)
    speed: float = Field(default=1.0, gt=0)  # relative to the models' tokens_per_s


class SimNode(StrictModel):
    node_id: str = Field(min_length=1)
    devices: list[SimDevice] = Field(min_length=1)
    models: list[str] | None = None  # model ids this node serves; None: every model


class Pin(StrictModel):
    """A model loaded on a device before the first request (and kept, where a policy pins)."""

    model: str
    node: str
    device: str


class AgentSettings(StrictModel):
    """The node agent's per-device rules, as in its config."""

    pending_limit: int = Field(default=4, ge=1)  # max_pending_requests_per_device
    max_switch_wait_s: float = Field(default=30.0, ge=0)
    queue_timeout_s: float = Field(default=600.0, gt=0)  # request_timeout_s


class DispatcherSettings(StrictModel):
    max_attempts: int = Field(default=3, ge=1)
    default_load_s: float = Field(default=5.0, ge=0)
    busy_retry_after_s: float = Field(default=1.0, gt=0)
    memory_safety_margin: float = Field(default=0.9, gt=0, le=1)
    # Buffering (dispatcher/config.py): requests held at the dispatcher while every
    # candidate is busy, and for how long; 0 requests: answer 503 at once, as before.
    max_buffered_requests: int = Field(default=512, ge=0)
    cost_model: CostModel = Field(default_factory=CostModel)  # the dispatcher's own
    buffer_timeout_s: float = Field(default=300.0, gt=0)


class ClientSettings(StrictModel):
    """What clients do with a 503: the openai SDK retries twice, after Retry-After."""

    retries: int = Field(default=2, ge=0)


class ClusterFile(StrictModel):
    name: str = "cluster"
    loads: Loads = "warm"
    load_time: LoadTime = Field(default_factory=LoadTime)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    models: list[SimModel] = Field(min_length=1)
    nodes: list[SimNode] = Field(min_length=1)
    pins: list[Pin] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> ClusterFile:
        ids = [m.model_id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError("models: a model_id appears twice")
        roles = {r for m in self.models for r in m.roles}
        if clash := roles & set(ids):
            raise ValueError(f"models: {sorted(clash)[0]!r} is both a role and a model_id")
        nodes = [n.node_id for n in self.nodes]
        if len(set(nodes)) != len(nodes):
            raise ValueError("nodes: a node_id appears twice")
        for n in self.nodes:
            for m in n.models or []:
                if m not in ids:
                    raise ValueError(f"nodes: {n.node_id}: unknown model {m!r}")
            devs = [d.device_id for d in n.devices]
            if len(set(devs)) != len(devs):
                raise ValueError(f"nodes: {n.node_id}: a device_id appears twice")
        for p in self.pins:
            node = next((n for n in self.nodes if n.node_id == p.node), None)
            if node is None or p.device not in {d.device_id for d in node.devices}:
                raise ValueError(f"pins: no device {p.node}/{p.device}")
            if p.model not in self.serves(node):
                raise ValueError(f"pins: {p.node} does not serve {p.model!r}")
        return self

    @cached_property
    def model_by_id(self) -> dict[str, SimModel]:
        return {m.model_id: m for m in self.models}

    def serves(self, node: SimNode) -> list[str]:
        return node.models if node.models is not None else [m.model_id for m in self.models]

    def load_seconds(self, model: SimModel, loads: Loads | None = None) -> float:
        if model.load_s is not None:
            return model.load_s
        lt = self.load_time
        slope = lt.warm_s_per_gb if (loads or self.loads) == "warm" else lt.cold_s_per_gb
        return lt.base_s + slope * model.gb

    def names(self) -> list[str]:
        """Every name a request may use: roles in the order first met, then model ids."""
        roles = list(dict.fromkeys(r for m in self.models for r in m.roles))
        return roles + [m.model_id for m in self.models]

    def resolve(self, name: str) -> tuple[str, ...]:
        """A request's `model`: a model id, or every model carrying the role."""
        if name in self.model_by_id:
            return (name,)
        return tuple(m.model_id for m in self.models if name in m.roles)

    def one_device(self) -> ClusterFile:
        """The same models on the first device of the first node alone: a one-GPU box."""
        node = self.nodes[0]
        box = SimNode(node_id=node.node_id, devices=[node.devices[0]], models=node.models)
        pins = [p for p in self.pins
                if p.node == node.node_id and p.device == node.devices[0].device_id]
        return self.model_copy(update={"nodes": [box], "pins": pins, "name": self.name + "-1gpu"})


def load_cluster(text: str, *, source: str = "<cluster>") -> ClusterFile:
    return load_config(text, ClusterFile, source=source)


def load_cluster_file(path: str | Path) -> ClusterFile:
    return load_config_file(path, ClusterFile)
