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

KV cache, compute buffer and output buffer follow in kv_cache_bytes and compute_bytes.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rolemesh.gguf_tensors import TENSOR_ALIGNMENT, TensorInfo, cache_type_bytes
from rolemesh.memory_estimate import CTX_PAD, MIB, GGUFFacts

HOST = "host"
DEFAULT_UBATCH = 512
DEFAULT_BATCH = 2048
# llama.cpp's LLM_FFN_EXPS_REGEX in this build (common/common.h), and its per-block form.
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
QUANTIZED_CACHE_TYPES = frozenset({"q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"})
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


@dataclass(frozen=True)
class MemoryPart:
    """What one device (or the host) holds for the model: bytes, and MiB rounded up."""

    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    compute_buffer_bytes: int = 0
    projector_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_cache_bytes + self.compute_buffer_bytes
                + self.projector_bytes)

    @property
    def weights_mb(self) -> int:
        return _mib(self.weights_bytes)

    @property
    def kv_cache_mb(self) -> int:
        return _mib(self.kv_cache_bytes)

    @property
    def compute_buffer_mb(self) -> int:
        return _mib(self.compute_buffer_bytes)

    @property
    def projector_mb(self) -> int:
        return _mib(self.projector_bytes)

    @property
    def total_mb(self) -> int:
        return _mib(self.total_bytes)


@dataclass(frozen=True)
class MemoryBreakdown:
    """The need of one placement: per device of the group, and in host RAM.

    On a CPU-only placement (device "cpu") the device *is* host RAM: everything is in
    per_device["cpu"] and `host` is empty, so nothing is counted twice. On GPUs, `host`
    is what stays in system RAM (token embedding, CPU layers, experts kept on the CPU,
    their KV cache and the host compute/output buffers).
    """

    per_device: dict[str, MemoryPart]
    host: MemoryPart
    # Of the host part, the weights llama.cpp maps from the file (mmap): the kernel can page
    # them from disk when RAM is short, which is what allow_disk_paging accepts.
    host_pageable_mb: int = 0
    notes: tuple[str, ...] = ()

    @property
    def per_device_mb(self) -> dict[str, int]:
        return {device: part.total_mb for device, part in self.per_device.items()}

    @property
    def host_mb(self) -> int:
        return self.host.total_mb

    @property
    def total_mb(self) -> int:
        return sum(self.per_device_mb.values()) + self.host_mb

    def _sum(self, component: str, with_host: bool = True) -> int:
        parts = [*self.per_device.values(), *([self.host] if with_host else [])]
        return _mib(sum(getattr(p, component) for p in parts))

    @property
    def weights_gpu_mb(self) -> int:
        """Weights on the group's devices (on a CPU-only placement: on the cpu device)."""
        return self._sum("weights_bytes", with_host=False)

    @property
    def weights_host_mb(self) -> int:
        return self.host.weights_mb

    @property
    def kv_cache_mb(self) -> int:
        return self._sum("kv_cache_bytes")

    @property
    def compute_buffer_mb(self) -> int:
        return self._sum("compute_buffer_bytes")

    @property
    def projector_mb(self) -> int:
        return self._sum("projector_bytes")


@dataclass(frozen=True)
class HostFit:
    ok: bool
    paging: bool  # fits only because mmap'd weights will be paged from disk
    note: str


def host_fit(host_need_mb: int, host_available_mb: int | None, allow_disk_paging: bool,
             unpageable_mb: int = 0) -> HostFit:
    """Whether a placement's host-RAM part fits what the host has available now.

    Beyond what is available, only weights mapped from the file can live on disk (the
    kernel pages them in as they are read): so with allow_disk_paging the placement still
    fits when the part that cannot page (KV cache and buffers kept on the host,
    `unpageable_mb`) fits. An unknown figure (None) does not refuse.
    """
    if host_available_mb is None:
        return HostFit(True, False, "host memory unknown: not checked")
    if host_need_mb <= host_available_mb:
        return HostFit(True, False, f"host RAM: needs {host_need_mb} MB of "
                                    f"{host_available_mb} MB available")
    short = host_need_mb - host_available_mb
    if allow_disk_paging and unpageable_mb <= host_available_mb:
        return HostFit(True, True, f"host RAM: needs {host_need_mb} MB, {host_available_mb} MB "
                                   f"available: {short} MB of weights will be paged from disk "
                                   "through mmap (allow_disk_paging; slow)")
    why = ("even with disk paging the KV cache and buffers kept on the host need "
           f"{unpageable_mb} MB" if allow_disk_paging
           else "set allow_disk_paging: true to page the weights from disk")
    return HostFit(False, False, f"host RAM: needs {host_need_mb} MB, only "
                                 f"{host_available_mb} MB available ({why})")


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


# -- KV cache and buffers ----------------------------------------------------------------------

def cells_per_stream(facts: GGUFFacts, ctx_size: int | None, parallel: int) -> int | None:
    """KV cells of one sequence: ctx_size / parallel (or the trained context), padded to 256."""
    per_sequence = math.ceil(ctx_size / parallel) if ctx_size else facts.context_length
    if per_sequence is None:
        return None
    return math.ceil(per_sequence / CTX_PAD) * CTX_PAD


def kv_layer_bytes(facts: GGUFFacts, model: PlacementConfig) -> int | None:
    """One layer's K and V caches for every sequence, at cache_type_k / cache_type_v."""
    cells = cells_per_stream(facts, model.ctx_size, model.parallel)
    n_head, n_head_kv, n_embd = facts.n_head, facts.n_head_kv, facts.n_embd
    if cells is None or n_head is None or n_head_kv is None:
        return None
    head = n_embd // n_head if n_embd is not None else None
    key_length, value_length = facts.key_length or head, facts.value_length or head
    if key_length is None or value_length is None:
        return None
    rows = cells * model.parallel
    return rows * (cache_type_bytes(model.cache_type_k, n_head_kv * key_length)
                   + cache_type_bytes(model.cache_type_v, n_head_kv * value_length))


def micro_batch(model: PlacementConfig, facts: GGUFFacts) -> int:
    """llama.cpp's n_ubatch: min(ubatch, batch, the whole context)."""
    batch = model.batch_size or DEFAULT_BATCH
    cells = cells_per_stream(facts, model.ctx_size, model.parallel)
    if cells is not None:
        batch = min(batch, cells * model.parallel)
    return max(1, min(model.ubatch_size or DEFAULT_UBATCH, batch))


def compute_bytes(facts: GGUFFacts, model: PlacementConfig) -> int:
    """The compute buffer ggml reserves for one micro-batch (the worst case graph).

    Fitted to what this llama.cpp reserves on CPU (bench/memory_accuracy.py), with n_ub
    tokens per micro-batch and n_kv cells per sequence: the attention mask is live all
    along (f16 with flash attention, else f32), plus the larger of two stages:
      feed-forward: n_ub * (20 * n_embd + 12 * width + 8 * n_expert) bytes, where width
                    is n_ff, or an expert's width * active experts for a MoE;
      attention:    n_ub * 4 * (6 * q width + 2 * kv width), and without flash
                    attention the scores too, n_kv * n_ub * 4 * n_head.
    """
    n_embd = facts.n_embd or 0
    n_head = facts.n_head or 1
    n_ub = micro_batch(model, facts)
    n_kv = cells_per_stream(facts, model.ctx_size, model.parallel) or 0
    flash = model.flash_attn is not False
    head_k = facts.key_length or (n_embd // n_head)
    q_width, kv_width = n_head * head_k, (facts.n_head_kv or n_head) * head_k
    if facts.n_expert:
        width = (facts.n_ff_expert or facts.n_ff or 0) * (facts.n_expert_used or 1)
    else:
        width = facts.n_ff or 0
    mask = n_kv * n_ub * (2 if flash else 4)
    ffn = n_ub * (20 * n_embd + 12 * width + 8 * (facts.n_expert or 0))
    attention = n_ub * 4 * (6 * q_width + 2 * kv_width)
    if not flash:
        attention += n_kv * n_ub * 4 * n_head
    return mask + max(ffn, attention)


def output_bytes(facts: GGUFFacts, model: PlacementConfig) -> int:
    """The logits llama.cpp keeps for the last token of each sequence (host memory)."""
    return (facts.n_vocab or 0) * 4 * model.parallel


def _mib(nbytes: int) -> int:
    return -(-nbytes // MIB)


def estimate_need(model: PlacementConfig, facts: GGUFFacts,
                  devices: Sequence[str] = ("gpu:0",), split: Sequence[float] | None = None,
                  projector_bytes: int = 0) -> MemoryBreakdown:
    """The memory a model needs placed on `devices` (["cpu"], or a GPU group).

    split: shares per device when the model sets no tensor_split (llama.cpp uses each
    device's free memory); equal when neither is given. projector_bytes: the mmproj
    file's size (see projector_size), charged to the first device of the group.
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
    holders = {d for d in devices if weights.get(d) or kv.get(d)}
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
    """The mmproj file's size in bytes (0 without one); llama.cpp loads it whole."""
    if model.mmproj is None:
        return 0
    return Path(model.mmproj).stat().st_size


__all__ = ["HOST", "TENSOR_ALIGNMENT", "HostFit", "MemoryBreakdown", "MemoryPart",
           "Placement", "PlacementConfig", "TensorInfo", "estimate_need", "host_fit",
           "place_tensors", "projector_size"]
