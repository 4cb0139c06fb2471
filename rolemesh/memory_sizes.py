"""The sizes of what llama.cpp allocates besides the weights: KV cache, compute and output
buffers, as this llama.cpp sizes them (checked by tests/real/test_memory_real.py)."""

from __future__ import annotations

import math
from typing import Protocol

from rolemesh.gguf_tensors import cache_type_bytes
from rolemesh.memory_estimate import CTX_PAD, GGUFFacts

DEFAULT_UBATCH = 512
DEFAULT_BATCH = 2048


class BufferConfig(Protocol):
    """The fields of a model's config that size its buffers."""

    @property
    def ctx_size(self) -> int | None: ...
    @property
    def parallel(self) -> int: ...
    @property
    def batch_size(self) -> int | None: ...
    @property
    def ubatch_size(self) -> int | None: ...
    @property
    def flash_attn(self) -> bool | None: ...
    @property
    def cache_type_k(self) -> str: ...
    @property
    def cache_type_v(self) -> str: ...


def cells_per_stream(facts: GGUFFacts, ctx_size: int | None, parallel: int) -> int | None:
    """KV cells of one sequence: ctx_size / parallel (or the trained context), padded to 256."""
    per_sequence = math.ceil(ctx_size / parallel) if ctx_size else facts.context_length
    if per_sequence is None:
        return None
    return math.ceil(per_sequence / CTX_PAD) * CTX_PAD


def kv_layer_bytes(facts: GGUFFacts, model: BufferConfig) -> int | None:
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


def micro_batch(model: BufferConfig, facts: GGUFFacts) -> int:
    """llama.cpp's n_ubatch: min(ubatch, batch, the whole context)."""
    batch = model.batch_size or DEFAULT_BATCH
    cells = cells_per_stream(facts, model.ctx_size, model.parallel)
    if cells is not None:
        batch = min(batch, cells * model.parallel)
    return max(1, min(model.ubatch_size or DEFAULT_UBATCH, batch))


def compute_bytes(facts: GGUFFacts, model: BufferConfig) -> int:
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


def output_bytes(facts: GGUFFacts, model: BufferConfig) -> int:
    """The logits llama.cpp keeps for the last token of each sequence (host memory)."""
    return (facts.n_vocab or 0) * 4 * model.parallel
