"""The wire contract between node agents and the dispatcher.

Both sides import these models; `extra="forbid"` makes a drift between them fail loudly.
Units live in field names; an unknown figure is `None`, never a made-up number.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 2


class WireModel(BaseModel):
    # Non-finite numbers are not JSON: refuse them on the way in, never echo them out.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class InstanceState(StrEnum):
    """The lifecycle of one model instance (one llama-server process)."""

    EMPTY = "empty"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # takes no new requests; stops when its last one ends
    STOPPING = "stopping"
    FAILED = "failed"


class StopReason(StrEnum):
    """Why an instance was stopped: in the log, the inventory and the events."""

    EVICTED_FOR = "evicted_for"  # made room for another model (detail names it)
    TTL = "ttl"  # idle longer than its ttl_s
    UNLOAD = "unload"  # an operator asked
    DRAIN = "drain"  # its node was drained
    MODE = "mode"  # its device was held for a set it is not in
    MOVED = "moved"  # a pinned model went back to a better device
    CRASH = "crash"  # the process died by itself
    SHUTDOWN = "shutdown"  # the agent stopped


class MemorySource(StrEnum):
    ESTIMATED = "estimated"  # from the GGUF and the config
    MEASURED = "measured"  # what the process was seen to take after a load


class InstanceStatus(WireModel):
    """One model instance resident on a device (or on a device group, seen per device)."""

    model_id: str
    devices: list[str]  # its placement: one device, or every device of a group
    state: InstanceState
    in_flight: int = 0
    queued: int = 0  # requests waiting for this instance
    parallel: int = 1
    memory_charged_mb: int = 0  # what the budget of this device counts for it (its share)
    memory_source: MemorySource = MemorySource.ESTIMATED
    memory_estimated_mb: int | None = None
    memory_measured_mb: int | None = None
    pinned: bool = False
    idle_s: float | None = None  # seconds since its last request ended; None while busy
    ttl_left_s: float | None = None  # None: no TTL (or busy, or pinned)
    last_load_s: float | None = None
    restarts: int = 0
    draining_for: str | None = None  # why it takes no new requests: "evicted_for:X", "unload"
    last_error: str | None = None


class StopRecord(WireModel):
    """A recent stop of an instance on this node, with its reason."""

    model_id: str
    devices: list[str]
    reason: StopReason
    detail: str | None = None  # for evicted_for: the model it made room for
    age_s: float


class DeviceStatus(WireModel):
    """One device of a node as the node sees it now, with the instances it holds."""

    device_id: str  # "gpu:0", "cpu"
    name: str
    backend: str
    memory_total_mb: int | None
    memory_used_mb: int | None  # what the backend reports (None when it cannot tell)
    memory_free_mb: int | None
    utilization_pct: float | None = None
    memory_charged_mb: int = 0  # the sum charged to its resident instances
    instances: list[InstanceStatus] = Field(default_factory=list)
    in_flight: int = 0  # over all its instances
    pending: int = 0  # waiting, not yet sent upstream (over all models)
    pending_limit: int = 2  # in_flight + pending never exceed this
    mode: str | None = None  # a set held by the operator; None: auto
    failed_models: dict[str, float] = Field(default_factory=dict)  # model -> backoff left, s
    last_error: str | None = None


class ModelStatus(WireModel):
    """A model a node can serve, with what it costs to hold and to load."""

    model_id: str
    roles: list[str] = Field(default_factory=list)
    file_size_mb: int
    memory_need_mb: int  # on the device(s): weights there + KV cache + buffers
    memory_source: MemorySource = MemorySource.ESTIMATED
    host_memory_need_mb: int = 0  # in host RAM (weights kept off the GPU)
    allow_disk_paging: bool = False  # its host-side weights may page from disk (mmap)
    # The need on its first placement, by component: weights_gpu_mb, kv_cache_mb,
    # compute_buffer_mb, projector_mb, weights_host_mb, host_mb.
    memory_breakdown: dict[str, int] | None = None
    devices: list[str] | None = None  # a fixed placement (a device or a group); None: any one
    split: list[float] | None = None  # the group's tensor_split, one weight per device
    pinned: bool = False
    preload: bool = False
    exclusive: bool = False
    ttl_s: float | None = None
    last_load_s: float | None = None  # measured on this node; None before the first load
    # Device seconds one request takes (rolemesh.service_time), over the recent ones on
    # this node; None before the first ends.
    service_s: float | None = None
    recent_requests: int = 0  # served on this node in the recent window
    ctx_size: int | None = None  # its context window in tokens; None: unknown


class NodeInventory(WireModel):
    schema_version: int = SCHEMA_VERSION
    node_id: str
    url: str  # where the dispatcher reaches this node's agent
    backend: str
    seq: int = 0  # rises with every report; the dispatcher drops older ones
    devices: list[DeviceStatus]
    models: list[ModelStatus]
    sets: dict[str, list[str]] = Field(default_factory=dict)  # named sets that may share
    draining: bool = False
    co_residency: bool = True  # False: its devices hold one model at a time
    host_memory_total_mb: int | None = None
    host_memory_available_mb: int | None = None
    recent_stops: list[StopRecord] = Field(default_factory=list)


class RegisterRequest(WireModel):
    inventory: NodeInventory


class RegisterResponse(WireModel):
    node_id: str
    heartbeat_interval_s: float


class HeartbeatRequest(WireModel):
    schema_version: int = SCHEMA_VERSION
    node_id: str
    seq: int
    devices: list[DeviceStatus]
    models: list[ModelStatus] | None = None  # None: unchanged since the last report
    sets: dict[str, list[str]] | None = None  # None: unchanged
    draining: bool = False
    host_memory_total_mb: int | None = None
    host_memory_available_mb: int | None = None
    recent_stops: list[StopRecord] = Field(default_factory=list)


class DeregisterRequest(WireModel):
    node_id: str


class HeartbeatResponse(WireModel):
    accepted: bool  # False when the heartbeat was older than one already seen
    heartbeat_interval_s: float


class NodeState(StrEnum):
    UP = "up"
    DOWN = "down"


class ClusterDevice(WireModel):
    """A device as the dispatcher sees it: the node's report plus its own counts."""

    node_id: str
    status: DeviceStatus
    dispatcher_in_flight: int  # requests the dispatcher has sent and not seen finish


class ClusterNode(WireModel):
    node_id: str
    url: str
    backend: str
    state: NodeState
    last_heartbeat_age_s: float
    registered_age_s: float
    devices: list[ClusterDevice]
    models: list[ModelStatus]
    sets: dict[str, list[str]] = Field(default_factory=dict)
    draining: bool = False
    host_memory_total_mb: int | None = None
    host_memory_available_mb: int | None = None
    recent_stops: list[StopRecord] = Field(default_factory=list)


class ClusterNodes(WireModel):
    object: str = "list"
    data: list[ClusterNode]


class OpenAIModel(BaseModel):
    """An entry of OpenAI's `GET /v1/models`, with RoleMesh's extras."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "rolemesh"
    roles: list[str] = Field(default_factory=list)
    kind: str = "model"  # "model", "role" or "alias"
    models: list[str] | None = None  # for a role or alias: the model ids behind it


class OpenAIModelList(BaseModel):
    object: str = "list"
    data: list[OpenAIModel]
