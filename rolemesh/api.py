"""The wire contract between node agents and the dispatcher.

Both sides import these models; `extra="forbid"` makes a drift between them fail loudly.
Units live in field names; an unknown figure is `None`, never a made-up number.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SlotState(StrEnum):
    EMPTY = "empty"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"


class DeviceStatus(WireModel):
    """One device of a node as the node sees it now."""

    device_id: str  # "gpu:0", "cpu"
    name: str
    backend: str
    memory_total_mb: int | None
    memory_used_mb: int | None
    memory_free_mb: int | None
    utilization_pct: float | None = None
    slot_state: SlotState = SlotState.EMPTY
    loaded_model: str | None = None
    in_flight: int = 0
    pending: int = 0  # waiting, not yet sent upstream
    pending_limit: int = 2  # in_flight + pending never exceed this
    parallel: int = 1  # requests llama-server serves at once for the loaded model
    last_error: str | None = None


class ModelStatus(WireModel):
    """A model a node can serve, with what it costs to hold and to load."""

    model_id: str
    roles: list[str] = Field(default_factory=list)
    file_size_mb: int
    memory_need_mb: int  # weights + KV cache for the configured context
    last_load_s: float | None = None  # measured on this node; None before the first load
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
