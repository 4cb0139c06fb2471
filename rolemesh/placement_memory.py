"""Where a model's memory goes under llama-server: per device of its group, and host RAM.

A pure function of the model's config, its GGUF facts (with the tensor table) and the
device group. It follows llama.cpp's own placement rules (llama_model::load_tensors):

- the token embedding (the input layer) always stays in host memory;
- with gpu_layers N below the layer count, the *first* n_layer - N repeating layers stay
  on the CPU and the last N go to the GPUs; the output layer (output.weight, output_norm)
  goes to a GPU only when N > n_layer (so `-ngl 999` or unset puts everything there);
- GPU layers are spread over the group by tensor_split: layer i of the offloaded ones goes
  to the first device whose cumulative share exceeds i / offloaded;
- override_tensor patterns ("regex=BUFTYPE"), then --cpu-moe and --n-cpu-moe N, are tried
  in that order against each tensor's name with a regex *search* (std::regex_search),
  first match wins; cpu_moe keeps every `.ffn_(up|down|gate|gate_up)_(ch|)exps` tensor in
  host memory, n_cpu_moe the experts of blocks 0..N-1;
- a layer's KV cache lives on that layer's device (offload_kqv, llama.cpp's default).

KV cache, compute and output buffers are sized in rolemesh/memory_sizes.py; the result
is a rolemesh/memory_breakdown.py MemoryBreakdown.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rolemesh.memory_breakdown import HostFit, MemoryBreakdown, MemoryPart, host_fit
from rolemesh.memory_estimate import GGUFFacts
from rolemesh.memory_sizes import (
    DEFAULT_BATCH,
    DEFAULT_UBATCH,
    cells_per_stream,
    compute_bytes,
    kv_layer_bytes,
    micro_batch,
    output_bytes,
)
from rolemesh.projector_memory import projector_bytes

HOST = "host"
# llama.cpp's LLM_FFN_EXPS_REGEX in this build (common/common.h), and its per-block form.
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_DEVICE_BUFFER = re.compile(r"^(CUDA|ROCm|Vulkan|SYCL|Metal|MUSA|CANN|OpenCL)(\d*)$")


class PlacementConfig(Protocol):
    """The fields of node_agent's ModelConfig that decide where memory goes."""

    @property
    def ctx_size(self) -> int | None: ...
    @property
    def parallel(self) -> int: ...
    @property
    def batch_size(self) -> int | None: ...
    @property
    def ubatch_size(self) -> int | None: ...
    @property
    def gpu_layers(self) -> int | None: ...
    @property
    def tensor_split(self) -> list[float] | None: ...
    @property
    def flash_attn(self) -> bool | None: ...
    @property
    def cache_type_k(self) -> str: ...
    @property
    def cache_type_v(self) -> str: ...
    @property
    def n_cpu_moe(self) -> int | None: ...
    @property
    def cpu_moe(self) -> bool: ...
    @property
    def override_tensor(self) -> list[str]: ...
    @property
    def mmproj(self) -> Path | None: ...


@dataclass(frozen=True)
class Placement:
    """A PlacementConfig of its own, for the CLI and tests: llama-server's defaults."""

    ctx_size: int | None = None
    parallel: int = 1
    batch_size: int | None = None
    ubatch_size: int | None = None
    gpu_layers: int | None = None
    tensor_split: list[float] | None = None
    flash_attn: bool | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    n_cpu_moe: int | None = None
    cpu_moe: bool = False
    override_tensor: list[str] = field(default_factory=list)
    mmproj: Path | None = None


# -- placement ---------------------------------------------------------------------------------

def _overrides(model: PlacementConfig) -> list[tuple[re.Pattern[str], str]]:
    """The (pattern, buffer type) list in the order llama-server receives it."""
    rules = []
    for entry in model.override_tensor:
        pattern, _, buffer = entry.rpartition("=")
        rules.append((re.compile(pattern), buffer))
    if model.cpu_moe:
        rules.append((re.compile(FFN_EXPS_REGEX), "CPU"))
    for i in range(model.n_cpu_moe or 0):
        rules.append((re.compile(rf"blk\.{i}{FFN_EXPS_REGEX}"), "CPU"))
    return rules


def _buffer_device(buffer: str, devices: Sequence[str]) -> str:
    """Where an override's buffer type puts a tensor: host, or one device of the group."""
    if buffer.upper().startswith("CPU") or buffer.endswith("_Host"):
        return HOST
    match = _DEVICE_BUFFER.match(buffer)
    if match is None:
        raise ValueError(f"override_tensor: unknown buffer type {buffer!r} (CPU, CUDA0, ...)")
    index = int(match[2] or 0)
    if devices == ["cpu"] or index >= len(devices):
        raise ValueError(f"override_tensor: {buffer} is not a device of {list(devices)}")
    return devices[index]


def _layer_devices(n_layer: int, gpu_layers: int | None, devices: Sequence[str],
                   split: Sequence[float]) -> list[str]:
    """The device of each repeating layer 0..n_layer-1, and of the output layer (last)."""
    n_gpu = n_layer + 1 if gpu_layers is None or gpu_layers < 0 else gpu_layers
    first_gpu = max(n_layer - n_gpu, 0)
    offloaded = min(n_gpu, n_layer + 1)
    total = sum(split)
    bounds = list(_cumulative([s / total for s in split]))
    out = []
    for il in range(n_layer + 1):
        if il < first_gpu or il - first_gpu >= offloaded:
            out.append(HOST)
            continue
        index = bisect.bisect_right(bounds, (il - first_gpu) / offloaded)
        out.append(devices[min(index, len(devices) - 1)])
    return out


def _cumulative(values: Sequence[float]) -> list[float]:
    running, out = 0.0, []
    for v in values:
        running += v
        out.append(running)
    return out


def _tensor_layer(name: str, n_layer: int) -> int | None:
    """A tensor's layer: blk.N → N, output* → n_layer (the output layer), else None (input)."""
    match = _BLOCK.match(name)
    if match:
        return min(int(match[1]), n_layer)
    if name.startswith(("token_embd", "token_types", "pos_embd")):
        return None
    return n_layer


def place_tensors(model: PlacementConfig, facts: GGUFFacts, devices: Sequence[str],
                  split: Sequence[float] | None = None) -> dict[str, int]:
    """Weight bytes per device (and HOST), tensor by tensor, by llama.cpp's rules."""
    n_layer = facts.n_layer or 0
    layer_dev = _layer_devices(n_layer, model.gpu_layers, devices, _split(model, devices, split))
    rules = _overrides(model)
    placed: dict[str, int] = {}
    names = {t.name for t in facts.tensors}
    for tensor in facts.tensors:
        layer = _tensor_layer(tensor.name, n_layer)
        where = HOST if layer is None else layer_dev[layer]
        for pattern, buffer in rules:
            if pattern.search(tensor.name):
                where = _buffer_device(buffer, devices)
                break
        placed[where] = placed.get(where, 0) + tensor.padded_nbytes
    tied = next((t for t in facts.tensors if t.name == "token_embd.weight"), None)
    if tied is not None and "output.weight" not in names and layer_dev[n_layer] != HOST:
        # Tied embeddings: llama.cpp loads token_embd a second time as the output tensor,
        # on the output layer's device.
        placed[layer_dev[n_layer]] = placed.get(layer_dev[n_layer], 0) + tied.padded_nbytes
    return placed


def _split(model: PlacementConfig, devices: Sequence[str],
           split: Sequence[float] | None) -> list[float]:
    shares = list(model.tensor_split or split or [])
    shares = (shares + [0.0] * len(devices))[:len(devices)]
    if not any(s > 0 for s in shares):
        return [1.0] * len(devices)  # llama.cpp splits by free memory; equal here
    return shares


def estimate_need(model: PlacementConfig, facts: GGUFFacts,
                  devices: Sequence[str] = ("gpu:0",), split: Sequence[float] | None = None,
                  projector_bytes: int = 0) -> MemoryBreakdown:
    """The memory a model needs placed on `devices` (["cpu"], or a GPU group).

    split: shares per device when the model sets no tensor_split (llama.cpp uses each
    device's free memory); equal when neither is given. projector_bytes: the mmproj's
    need (projector_size(model), read once at start-up), charged to the group's first
    device.
    """
    devices = list(devices)
    if not devices:
        raise ValueError("a placement needs at least one device")
    if model.parallel < 1:
        raise ValueError(f"parallel must be at least 1, not {model.parallel}")
    cpu_only = devices == ["cpu"]
    n_layer = facts.n_layer or 0
    layer_dev = _layer_devices(n_layer, model.gpu_layers, devices, _split(model, devices, split))
    if cpu_only:
        layer_dev = ["cpu"] * (n_layer + 1)

    weights = _weights(model, facts, devices, split, layer_dev)
    kv_per_layer = kv_layer_bytes(facts, model) or 0
    kv: dict[str, int] = {}
    for il in range(n_layer):
        kv[layer_dev[il]] = kv.get(layer_dev[il], 0) + kv_per_layer
    compute = compute_bytes(facts, model)
    notes: list[str] = []
    if kv_layer_bytes(facts, model) is None:
        notes.append("the GGUF lacks the figures for its KV cache: counted as 0")

    host_key = "cpu" if cpu_only else HOST
    # The main GPU reserves a compute buffer even with no layers: llama.cpp offloads the big
    # matrix products of a prompt batch to it (--op-offload, on by default).
    holders = {devices[0]} | {d for d in devices if weights.get(d) or kv.get(d)}
    host_heavy = cpu_only or any(d == HOST for d in layer_dev[:n_layer]) or (
        weights.get(HOST, 0) > _input_bytes(facts))
    per_device: dict[str, MemoryPart] = {}
    for d in devices:
        if cpu_only:
            break
        per_device[d] = MemoryPart(
            weights_bytes=weights.get(d, 0), kv_cache_bytes=kv.get(d, 0),
            compute_buffer_bytes=compute if d in holders else 0,
            projector_bytes=projector_bytes if d == devices[0] else 0)
    host_compute = (compute if host_heavy else micro_batch(model, facts) * _row(facts)) \
        + output_bytes(facts, model)
    host_part = MemoryPart(
        weights_bytes=weights.get(host_key, 0), kv_cache_bytes=kv.get(host_key, 0),
        compute_buffer_bytes=host_compute,
        projector_bytes=projector_bytes if cpu_only else 0)
    if cpu_only:
        return MemoryBreakdown({"cpu": host_part}, MemoryPart(),
                               host_pageable_mb=host_part.weights_mb, notes=tuple(notes))
    return MemoryBreakdown(per_device, host_part, host_pageable_mb=host_part.weights_mb,
                           notes=tuple(notes))


def _row(facts: GGUFFacts) -> int:
    return 4 * (facts.n_embd or 0)


def _input_bytes(facts: GGUFFacts) -> int:
    return sum(t.padded_nbytes for t in facts.tensors if _tensor_layer(t.name, 1) is None)


def _weights(model: PlacementConfig, facts: GGUFFacts, devices: list[str],
             split: Sequence[float] | None, layer_dev: list[str]) -> dict[str, int]:
    if facts.tensors:
        if devices == ["cpu"]:
            return {"cpu": sum(t.padded_nbytes for t in facts.tensors)}
        return place_tensors(model, facts, devices, split)
    # No tensor table (figures built by hand): the file, spread like the layers.
    share: dict[str, int] = {}
    for d in layer_dev:
        key = "cpu" if devices == ["cpu"] else d
        share[key] = share.get(key, 0) + facts.file_size_bytes // max(len(layer_dev), 1)
    return share


def projector_size(model: PlacementConfig) -> int:
    """The mmproj's weights plus its image compute buffer in bytes (0 without one); see
    rolemesh/projector_memory.py. Reads the projector's header."""
    if model.mmproj is None:
        return 0
    return projector_bytes(model.mmproj)


__all__ = ["DEFAULT_BATCH", "DEFAULT_UBATCH", "HOST", "HostFit", "MemoryBreakdown",
           "MemoryPart", "Placement", "PlacementConfig", "cells_per_stream", "compute_bytes",
           "estimate_need", "host_fit", "kv_layer_bytes", "micro_batch", "output_bytes",
           "place_tensors", "projector_size"]
