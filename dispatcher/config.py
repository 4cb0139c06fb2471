"""The dispatcher's config: where it listens, who may talk to it, how it judges nodes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dispatcher.access_log import AccessLogConfig
from rolemesh.cost_model import CostModel
from rolemesh.routing_rules import RoutingTable
from rolemesh.token_file import read_token_file

TOKEN_ENV = "ROLEMESH_CLUSTER_TOKEN"
TIMEOUT_HEARTBEATS = 3  # node_timeout_s defaults to this many heartbeat intervals
FORGET_TIMEOUTS = 4  # node_forget_s defaults to this many node timeouts


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _is_name(value: str) -> bool:
    return bool(value) and not any(c.isspace() for c in value)


class DispatcherConfig(StrictModel):
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8080, ge=0, le=65535)
    cluster_token: str | None = Field(default=None, repr=False)
    # A file holding the token (mode 0600; systemd: $CREDENTIALS_DIRECTORY/cluster_token).
    cluster_token_file: str | None = None
    # Browser origins allowed to call the API (CORS); empty: none. "*" allows any.
    cors_allowed_origins: list[str] = Field(default_factory=list)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    node_timeout_s: float | None = Field(default=None, gt=0)  # None: 3 x heartbeat_interval_s
    node_forget_s: float | None = Field(default=None, gt=0)  # None: 4 x node_timeout_s
    vram_safety_margin: float = Field(default=0.9, gt=0, le=1)
    aliases: dict[str, str] = Field(default_factory=dict)  # alias -> role or model id
    # The old name of `aliases` (it never held roles): read, with a warning at start.
    roles: dict[str, str] | None = Field(default=None, exclude=True)
    routing: RoutingTable = Field(default_factory=RoutingTable)
    # Where PUT /v1/routing keeps the table; None: beside the config file (FILE.routing.json).
    routing_file: str | None = None
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(default=600.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Reliability (docs/reliability.md). A streamed request whose agent sends no response
    # headers for first_byte_timeout_s fails over and the node is suspect until it next
    # heartbeats; generous, since a cold load may come first. A stream that then sends
    # nothing for stream_idle_timeout_s ends with one `upstream_timeout` error event.
    first_byte_timeout_s: float = Field(default=120.0, gt=0)
    stream_idle_timeout_s: float = Field(default=120.0, gt=0)
    # A device that fails this many requests in a row is avoided for cooldown_s, doubling
    # on each further failure up to cooldown_max_s (never when it is the last candidate).
    cooldown_after_failures: int = Field(default=3, ge=1)
    cooldown_s: float = Field(default=5.0, gt=0)
    cooldown_max_s: float = Field(default=60.0, gt=0)
    # Registration refuses link-local and cloud metadata addresses and URLs with a
    # user:password part; true lets them register (a lab where agents live there).
    allow_unsafe_node_urls: bool = False
    # SIGTERM: stop taking requests, let open ones finish for at most this long, exit 0.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    max_attempts: int = Field(default=3, ge=1, le=16)
    busy_retry_after_s: float = Field(default=1.0, gt=0)
    default_load_s: float = Field(default=5.0, ge=0)
    # Buffering (dispatcher/buffering.py): while every device that could serve a request
    # is busy, hold it here (at most this many at once, each at most this long) and place
    # it the moment one frees; 0 turns it off (503 at once). Ollama queues 512 by default.
    max_buffered_requests: int = Field(default=512, ge=0)
    buffer_timeout_s: float = Field(default=300.0, gt=0)
    # What a load, a copy and an eviction count against waiting (docs/scheduling.md).
    cost_model: CostModel = Field(default_factory=CostModel)
    api_keys: list[str] | None = Field(default=None, repr=False)
    # Keys for operator actions: load, unload, drain, mode (dispatcher/admin.py) and
    # PUT /v1/routing; the cluster token may too. They open the client endpoints as well.
    admin_keys: list[str] | None = Field(default=None, repr=False)
    # One JSON line per request (dispatcher/access_log.py); None: off.
    access_log: AccessLogConfig | None = None
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("aliases", "roles")
    @classmethod
    def _aliases_are_names(cls, value: dict[str, str]) -> dict[str, str]:
        for alias, target in value.items():
            if not _is_name(alias):
                raise ValueError(f"{alias!r} is not an alias name")
            if not _is_name(target):
                raise ValueError(f"{alias}: {target!r} is not a role or model id")
            if alias == target:
                raise ValueError(f"{alias}: an alias cannot name itself")
            if target in value:
                raise ValueError(f"{alias}: {target!r} is itself an alias; aliases do not "
                                 "chain, name the role or model id")
        return value

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _api_keys_are_given(cls, value: list[str] | None, info: ValidationInfo
                            ) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(f"an empty list would refuse every client; leave {info.field_name} "
                             "out instead")
        if any(not key.strip() for key in value):
            raise ValueError("an api key cannot be empty")
        return value

    @model_validator(mode="after")
    def _old_roles_key(self) -> DispatcherConfig:
        if self.roles is not None:
            if self.aliases:
                raise ValueError("roles: is the old name of aliases: give aliases only")
            self.aliases = self.roles
        return self

    @model_validator(mode="after")
    def _routing_file_beside_config(self, info: ValidationInfo) -> DispatcherConfig:
        source = (info.context or {}).get("source")
        if self.routing_file is None and source and not source.startswith("<"):
            path = Path(source)
            self.routing_file = str(path.with_name(path.stem + ".routing.json"))
        return self

    @property
    def deprecated_keys(self) -> list[str]:
        return ["roles"] if self.roles is not None else []

    @model_validator(mode="after")
    def _resolve(self) -> DispatcherConfig:
        if not self.cluster_token and self.cluster_token_file:
            self.cluster_token = read_token_file(self.cluster_token_file)
        if not self.cluster_token:
            self.cluster_token = os.environ.get(TOKEN_ENV) or None
        if self.node_timeout_s is None:
            self.node_timeout_s = TIMEOUT_HEARTBEATS * self.heartbeat_interval_s
        elif self.node_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(f"node_timeout_s: {self.node_timeout_s:g} must be longer than "
                             f"heartbeat_interval_s ({self.heartbeat_interval_s:g}), or every "
                             "node would flap between up and down")
        if self.node_forget_s is None:
            self.node_forget_s = FORGET_TIMEOUTS * self.node_timeout_s
        elif self.node_forget_s <= self.node_timeout_s:
            raise ValueError(f"node_forget_s: {self.node_forget_s:g} must be longer than "
                             f"node_timeout_s ({self.node_timeout_s:g})")
        return self

    @property
    def timeout_s(self) -> float:
        assert self.node_timeout_s is not None  # resolved by the validator
        return self.node_timeout_s

    @property
    def forget_s(self) -> float:
        assert self.node_forget_s is not None  # resolved by the validator
        return self.node_forget_s

    def public_dump(self) -> dict[str, object]:
        """The resolved config for printing: secrets masked."""
        data = self.model_dump(mode="json")
        if data.get("cluster_token"):
            data["cluster_token"] = "***"
        for key in ("api_keys", "admin_keys"):
            if data.get(key):
                data[key] = ["***"] * len(data[key])
        return data
