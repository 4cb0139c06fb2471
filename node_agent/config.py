"""The node agent's config: what runs on this host and how."""

from __future__ import annotations

import os
import re
import socket
from functools import cached_property
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

from rolemesh.cost_model import CostModel
from rolemesh.token_file import read_token_file

Backend = Literal["auto", "cuda", "cpu", "rocm", "metal", "vulkan", "sycl"]

# Long flags that a structured field of ModelConfig sets (with their short spellings):
# repeating one in server_args is an error, not a silent override.
STRUCTURED_FLAGS: dict[str, str] = {
    "ctx_size": "--ctx-size -c",
    "batch_size": "--batch-size -b",
    "ubatch_size": "--ubatch-size -ub",
    "threads": "--threads -t",
    "threads_batch": "--threads-batch -tb",
    "gpu_layers": "--n-gpu-layers --gpu-layers -ngl",
    "main_gpu": "--main-gpu -mg",
    "tensor_split": "--tensor-split -ts",
    "flash_attn": "--flash-attn -fa",
    "alias": "--alias -a",
    "parallel": "--parallel -np",
    "embeddings": "--embeddings --embedding --pooling",
    "split_mode": "--split-mode -sm",
    "cache_type_k": "--cache-type-k -ctk",
    "cache_type_v": "--cache-type-v -ctv",
    "mmproj": "--mmproj -mm --mmproj-url -mmu --no-mmproj",
    "n_cpu_moe": "--n-cpu-moe -ncmoe",
    "cpu_moe": "--cpu-moe -cmoe",
    "override_tensor": "--override-tensor -ot",
}
# What llama-server accepts for --cache-type-k / --cache-type-v.
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
# Flags the agent itself owns: where the model lives and where the server listens.
# (--api-key too: llama-server listens on 127.0.0.1 only, and a key there would lock the agent
# out of its own child; the agent's cluster_token guards the node instead.)
AGENT_OWNED_FLAGS = ("--model", "-m", "--host", "--port", "--hf-repo", "-hf", "--model-url",
                     "-mu", "--hf-file", "-hff", "--api-key", "--api-key-file")


def _is_device_id(d: str) -> bool:
    return d == "cpu" or (d.startswith("gpu:") and d[4:].isdigit())


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(StrictModel):
    model_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/@+-]+$")
    path: Path
    roles: list[str] = Field(default_factory=list)
    ctx_size: int | None = Field(default=None, ge=16)
    batch_size: int | None = Field(default=None, ge=1)
    ubatch_size: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)
    threads_batch: int | None = Field(default=None, ge=1)
    gpu_layers: int | None = Field(default=None, ge=-1)
    main_gpu: int | None = Field(default=None, ge=0)
    tensor_split: list[float] | None = None
    flash_attn: bool | None = None
    alias: str | None = None
    parallel: int = Field(default=1, ge=1, le=256)
    embeddings: bool = False  # adds --embeddings --pooling mean
    split_mode: Literal["none", "layer", "row"] | None = None
    # Lifecycle (docs/lifecycle.md).
    pinned: bool = False  # loaded at start, restarted after a crash, never evicted
    preload: bool = False  # loaded at start, evictable like any other
    ttl_s: float | Literal["never"] | None = None  # idle time before unloading; None: default
    exclusive: bool = False  # runs alone on its device(s)
    devices: list[str] | None = None  # a fixed placement: one device, or a group split over
    memory_mb: int | None = Field(default=None, ge=1)  # the need, when the operator knows it
    # Memory placement (docs/memory.md): KV cache types, a vision projector, experts kept in
    # host RAM, tensor overrides, and whether weights may page from disk when RAM is short.
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    mmproj: Path | None = None
    n_cpu_moe: int | None = Field(default=None, ge=0)
    cpu_moe: bool = False
    override_tensor: list[str] = Field(default_factory=list)
    allow_disk_paging: bool = False
    server_args: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("server_args")
    @classmethod
    def _server_args_are_long_flags_not_set_elsewhere(
        cls, value: dict[str, str | int | float | bool | None]
    ) -> dict[str, str | int | float | bool | None]:
        taken = {flag for flags in STRUCTURED_FLAGS.values() for flag in flags.split()}
        for flag in value:
            if not flag.startswith("--"):
                raise ValueError(f"{flag!r}: server_args keys are long flags such as '--seed'")
            if flag in taken:
                field = next(f for f, fl in STRUCTURED_FLAGS.items() if flag in fl.split())
                raise ValueError(f"{flag!r} is set by the structured field '{field}'; use that")
            if flag in AGENT_OWNED_FLAGS:
                raise ValueError(f"{flag!r} is set by the agent itself and cannot be overridden")
        return value

    @field_validator("ttl_s")
    @classmethod
    def _ttl_is_positive(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, int | float) and value <= 0:
            raise ValueError("ttl_s must be > 0 seconds, or 'never'")
        return value

    @field_validator("devices")
    @classmethod
    def _devices_are_ids(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("name at least one device, or leave devices out")
        for d in value:
            if not _is_device_id(d):
                raise ValueError(f"{d!r} is not 'cpu' or 'gpu:N'")
        if len(set(value)) != len(value):
            raise ValueError("a device appears twice")
        if len(value) > 1 and "cpu" in value:
            raise ValueError("a device group is made of GPUs; 'cpu' cannot be in one")
        return value

    @model_validator(mode="after")
    def _group_settings_agree(self) -> ModelConfig:
        if self.tensor_split is not None and self.devices is not None and len(self.devices) > 1 \
                and len(self.tensor_split) != len(self.devices):
            raise ValueError(f"tensor_split has {len(self.tensor_split)} weights for "
                             f"{len(self.devices)} devices")
        if self.pinned and self.ttl_s not in (None, "never"):
            raise ValueError("a pinned model is never unloaded: ttl_s does not apply")
        return self

    @property
    def placement(self) -> tuple[str, ...] | None:
        return tuple(self.devices) if self.devices is not None else None

    @property
    def split(self) -> tuple[float, ...] | None:
        if self.devices is None or len(self.devices) < 2:
            return None
        return tuple(self.tensor_split) if self.tensor_split else None

    @field_validator("override_tensor")
    @classmethod
    def _overrides_are_pattern_equals_buffer(cls, value: list[str]) -> list[str]:
        for entry in value:
            pattern, sep, buffer = entry.rpartition("=")
            if not sep or not pattern or not buffer or "," in entry:
                raise ValueError(f"{entry!r} is not 'REGEX=BUFFER_TYPE' (such as "
                                 r"'\.ffn_.*_exps\.=CPU'; one override per item, no commas)")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{entry!r}: {pattern!r} is not a regex: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _quantized_v_cache_needs_flash_attention(self) -> ModelConfig:
        if self.cache_type_v not in ("f32", "f16", "bf16") and self.flash_attn is False:
            raise ValueError(f"cache_type_v {self.cache_type_v} needs flash attention "
                             "(llama.cpp refuses a quantized V cache with flash_attn off)")
        if self.mmproj is not None and self.parallel > 1:
            raise ValueError(f"parallel {self.parallel} with an mmproj: a vision model runs "
                             "images one at a time in llama.cpp; use parallel: 1")
        return self

    @field_validator("roles")
    @classmethod
    def _roles_are_names(cls, value: list[str]) -> list[str]:
        for role in value:
            if not role or any(c.isspace() for c in role):
                raise ValueError(f"{role!r} is not a role name")
        return value


class NodeAgentConfig(StrictModel):
    node_id: str = Field(default_factory=socket.gethostname, min_length=1)
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8081, ge=0, le=65535)
    advertise_url: str | None = None
    dispatcher_base_url: str | None = None
    cluster_token: str | None = Field(default=None, repr=False)
    # A file holding the token (mode 0600; systemd: $CREDENTIALS_DIRECTORY/cluster_token).
    cluster_token_file: str | None = None
    # Browser origins allowed to call the API (CORS); empty: none. "*" allows any.
    cors_allowed_origins: list[str] = Field(default_factory=list)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    backend: Backend = "auto"
    devices: list[str] | None = None
    llama_server_bin: str | None = None
    llama_server_startup_timeout_s: float = Field(default=30.0, gt=0)
    llama_server_probe_interval_s: float = Field(default=0.5, gt=0)
    llama_server_stop_grace_s: float = Field(default=5.0, ge=0)
    # 4: a burst of 4 fits one device without a 503; more waits at the dispatcher, which
    # places it when a device frees (2 refused 3-35% of requests in `rolemesh simulate`).
    max_pending_requests_per_device: int = Field(default=4, ge=1)
    max_switch_wait_s: float = Field(default=30.0, ge=0)
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    memory_safety_margin: float = Field(default=0.9, gt=0, le=1)
    # How the agent weighs its own devices for requests sent to it directly (the
    # dispatcher's `cost_model` decides the rest): docs/scheduling.md.
    cost_model: CostModel = Field(default_factory=CostModel)
    # Residency (docs/lifecycle.md).
    co_residency: bool = True  # False: one model per device at a time, each switch a restart
    cpu_device: bool = False  # on a GPU host, offer the CPU (host RAM) as one more device
    default_ttl_s: float | None = Field(default=None, gt=0)  # None: never unload when idle
    sets: dict[str, list[str]] = Field(default_factory=dict)  # models that may share a device
    load_failure_backoff_s: float = Field(default=2.0, gt=0)  # doubles per failure, to 5 min
    unload_timeout_s: float = Field(default=30.0, ge=0)  # wait for in-flight before stopping
    state_dir: Path = Field(default_factory=lambda: Path.home() / ".local/state/rolemesh")
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    models: list[ModelConfig] = Field(default_factory=list)

    @field_validator("state_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _paths_from_the_config_folder(self, info: ValidationInfo) -> NodeAgentConfig:
        """Relative model paths and state_dir are read from the config file's folder, not
        from wherever the agent was started."""
        source = (info.context or {}).get("source")
        if source and not str(source).startswith("<"):
            base = Path(source).resolve().parent

            def beside(path: Path) -> Path:
                return Path(os.path.normpath(base / path))
            if not self.state_dir.is_absolute():
                self.state_dir = beside(self.state_dir)
            for m in self.models:
                if not m.path.expanduser().is_absolute():
                    m.path = beside(m.path)
                if m.mmproj is not None and not m.mmproj.expanduser().is_absolute():
                    m.mmproj = beside(m.mmproj)
        return self

    @model_validator(mode="after")
    def _check(self) -> NodeAgentConfig:
        if self.cluster_token is None and self.cluster_token_file:
            self.cluster_token = read_token_file(self.cluster_token_file)
        if self.cluster_token is None:
            self.cluster_token = os.environ.get("ROLEMESH_CLUSTER_TOKEN") or None
        seen: set[str] = set()
        for m in self.models:
            if m.model_id in seen:
                raise ValueError(f"models: model_id {m.model_id!r} appears twice")
            seen.add(m.model_id)
        roles_and_ids = {m.model_id for m in self.models}
        for m in self.models:
            for role in m.roles:
                if role in roles_and_ids:
                    raise ValueError(f"models: role {role!r} is also a model_id")
        if self.devices is not None:
            for d in self.devices:
                if not _is_device_id(d):
                    raise ValueError(f"devices: {d!r} is not 'cpu' or 'gpu:N'")
        return self

    @model_validator(mode="after")
    def _sets_name_models(self) -> NodeAgentConfig:
        known = {m.model_id for m in self.models}
        for name, members in self.sets.items():
            if not members:
                raise ValueError(f"sets.{name}: a set names at least one model")
            unknown = sorted(set(members) - known)
            if unknown:
                raise ValueError(f"sets.{name}: {', '.join(unknown)} is not a model_id here")
        return self

    def ttl_of(self, model: ModelConfig) -> float | None:
        """Idle seconds before `model` is unloaded; None: never."""
        if model.pinned or model.ttl_s == "never":
            return None
        if isinstance(model.ttl_s, int | float):
            return float(model.ttl_s)
        return self.default_ttl_s

    @property
    def url(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"http://{host}:{self.listen_port}"

    @cached_property
    def _models_by_id(self) -> dict[str, ModelConfig]:
        return {m.model_id: m for m in self.models}

    def projector_problems(self) -> list[str]:
        """Each model's mmproj must be a file: checked where the model files are checked
        (at start-up, with `path`), not while parsing, so example configs still load."""
        return [f"models.{i}.mmproj ({m.model_id}): {m.mmproj} does not exist or is not a file"
                for i, m in enumerate(self.models)
                if m.mmproj is not None and not m.mmproj.is_file()]

    def model(self, model_id: str) -> ModelConfig | None:
        return self._models_by_id.get(model_id)

    def models_for(self, name: str) -> list[ModelConfig]:
        """The models a request's `model` names: one by id, or every model with that role."""
        exact = self.model(name)
        if exact is not None:
            return [exact]
        return [m for m in self.models if name in m.roles]

    def public_dump(self) -> dict[str, object]:
        """The resolved config for printing: secrets masked."""
        data = self.model_dump(mode="json")
        if data.get("cluster_token"):
            data["cluster_token"] = "***"
        return data
