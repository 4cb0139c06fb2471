"""Where a model's memory goes: llama.cpp's placement rules on hand-written tensor tables."""

from __future__ import annotations

import pytest
from gguf.constants import GGMLQuantizationType as T

from rolemesh.gguf_tensors import TensorInfo, cache_type_bytes
from rolemesh.memory_estimate import MIB, GGUFFacts
from rolemesh.placement_memory import (
    HOST,
    Placement,
    estimate_need,
    host_fit,
    kv_layer_bytes,
    place_tensors,
)

F16, F32, Q4K = int(T.F16), int(T.F32), int(T.Q4_K)


def dense_table(n_layer: int, n_embd: int, n_ff: int, n_vocab: int, kv: int,
                wtype: int = F16, tied: bool = False) -> tuple[TensorInfo, ...]:
    """A llama-style dense model's tensors (ggml dims: row length first)."""
    out = [TensorInfo("token_embd.weight", (n_embd, n_vocab), wtype)]
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [TensorInfo(b + "attn_norm.weight", (n_embd,), F32),
                TensorInfo(b + "attn_q.weight", (n_embd, n_embd), wtype),
                TensorInfo(b + "attn_k.weight", (n_embd, kv), wtype),
                TensorInfo(b + "attn_v.weight", (n_embd, kv), wtype),
                TensorInfo(b + "attn_output.weight", (n_embd, n_embd), wtype),
                TensorInfo(b + "ffn_norm.weight", (n_embd,), F32),
                TensorInfo(b + "ffn_gate.weight", (n_embd, n_ff), wtype),
                TensorInfo(b + "ffn_up.weight", (n_embd, n_ff), wtype),
                TensorInfo(b + "ffn_down.weight", (n_ff, n_embd), wtype)]
    out.append(TensorInfo("output_norm.weight", (n_embd,), F32))
    if not tied:
        out.append(TensorInfo("output.weight", (n_embd, n_vocab), wtype))
    return tuple(out)


def moe_table(n_layer: int, n_embd: int, n_ff_exp: int, n_expert: int, n_vocab: int,
              q_width: int, kv: int, wtype: int = F16,
              etype: int = F16) -> tuple[TensorInfo, ...]:
    out = [TensorInfo("token_embd.weight", (n_embd, n_vocab), wtype)]
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [TensorInfo(b + "attn_norm.weight", (n_embd,), F32),
                TensorInfo(b + "attn_q.weight", (n_embd, q_width), wtype),
                TensorInfo(b + "attn_k.weight", (n_embd, kv), wtype),
                TensorInfo(b + "attn_v.weight", (n_embd, kv), wtype),
                TensorInfo(b + "attn_output.weight", (q_width, n_embd), wtype),
                TensorInfo(b + "ffn_norm.weight", (n_embd,), F32),
                TensorInfo(b + "ffn_gate_inp.weight", (n_embd, n_expert), F32),
                TensorInfo(b + "ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert), etype),
                TensorInfo(b + "ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert), etype),
                TensorInfo(b + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert), etype)]
    out += [TensorInfo("output_norm.weight", (n_embd,), F32),
            TensorInfo("output.weight", (n_embd, n_vocab), wtype)]
    return tuple(out)


def facts_for(tensors: tuple[TensorInfo, ...], *, n_layer: int, n_embd: int, n_head: int,
              n_head_kv: int, n_vocab: int, n_ff: int, context_length: int = 4096,
              **extra: int) -> GGUFFacts:
    return GGUFFacts("llama", n_layer, n_embd, n_head, n_head_kv, context_length,
                     sum(t.padded_nbytes for t in tensors), n_vocab, n_ff, tensors=tensors,
                     **extra)


# An 8-layer dense model, 1024 wide: each layer's f16 weights are exactly 13 MiB
# (4 + 0.5 + 0.5 per attention projection block and 3 * 2.75 for the FFN), norms aside.
DENSE_T = dense_table(8, 1024, 2816, 32000, 256)
DENSE = facts_for(DENSE_T, n_layer=8, n_embd=1024, n_head=16, n_head_kv=4, n_vocab=32000,
                  n_ff=2816)
LAYER = sum(t.padded_nbytes for t in DENSE_T if t.name.startswith("blk.0."))
EMBD = 1024 * 32000 * 2
OUTPUT = EMBD + 1024 * 4


def test_all_layers_on_one_gpu_leave_only_the_token_embedding_in_host_memory():
    placed = place_tensors(Placement(), DENSE, ["gpu:0"])
    assert placed == {HOST: EMBD, "gpu:0": 8 * LAYER + OUTPUT}


@pytest.mark.parametrize(("gpu_layers", "gpu_share", "output_on_gpu"), [
    (None, 8, True), (-1, 8, True), (99, 8, True), (9, 8, True),
    (8, 8, False),  # every repeating layer, but the output layer only with N > n_layer
    (5, 5, False), (1, 1, False), (0, 0, False),
])
def test_gpu_layers_keeps_the_first_layers_on_the_cpu(gpu_layers, gpu_share, output_on_gpu):
    placed = place_tensors(Placement(gpu_layers=gpu_layers), DENSE, ["gpu:0"])
    assert placed.get("gpu:0", 0) == gpu_share * LAYER + (OUTPUT if output_on_gpu else 0)
    assert placed[HOST] == EMBD + (8 - gpu_share) * LAYER + (0 if output_on_gpu else OUTPUT)


def test_with_partial_layers_the_kv_cache_follows_each_layer():
    need = estimate_need(Placement(ctx_size=4096, gpu_layers=6), DENSE, ["gpu:0"])
    per_layer = kv_layer_bytes(DENSE, Placement(ctx_size=4096))
    assert per_layer == 4096 * 2 * 256 * 2  # cells * (K + V) * kv width * f16
    assert need.per_device["gpu:0"].kv_cache_bytes == 6 * per_layer
    assert need.host.kv_cache_bytes == 2 * per_layer
    # layers on the CPU run there: the host gets a full compute buffer too
    assert need.host.compute_buffer_bytes > need.per_device["gpu:0"].compute_buffer_bytes


def test_tensor_split_spreads_the_offloaded_layers_like_llama_cpp():
    placed = place_tensors(Placement(tensor_split=[3, 1]), DENSE, ["gpu:0", "gpu:1"])
    # 9 offloaded layers (8 + output): i/9 < 0.75 for i = 0..6 → gpu:0 gets layers 0-6
    assert placed["gpu:0"] == 7 * LAYER
    assert placed["gpu:1"] == LAYER + OUTPUT
    even = place_tensors(Placement(), DENSE, ["gpu:0", "gpu:1"])
    assert even["gpu:0"] == 5 * LAYER  # 0/9 .. 4/9 < 0.5
    assert even["gpu:1"] == 3 * LAYER + OUTPUT


def test_tied_embeddings_are_loaded_again_as_the_output_on_the_gpu():
    tied = facts_for(dense_table(2, 256, 512, 1000, 256, tied=True), n_layer=2, n_embd=256,
                     n_head=4, n_head_kv=4, n_vocab=1000, n_ff=512)
    embd = 256 * 1000 * 2
    assert place_tensors(Placement(), tied, ["gpu:0"])[HOST] == embd
    on_gpu = place_tensors(Placement(), tied, ["gpu:0"])["gpu:0"]
    on_cpu = place_tensors(Placement(gpu_layers=2), tied, ["gpu:0"])["gpu:0"]
    assert on_gpu - on_cpu == embd + 256 * 4  # a copy of token_embd, and output_norm


# -- mixture of experts -------------------------------------------------------------------------

MOE_T = moe_table(4, 512, 256, 8, 1000, 512, 128)
MOE = facts_for(MOE_T, n_layer=4, n_embd=512, n_head=8, n_head_kv=2, n_vocab=1000, n_ff=256,
                n_expert=8, n_expert_used=2)
EXPERTS = 3 * 512 * 256 * 8 * 2  # one layer's gate, up, down experts in f16


def test_cpu_moe_keeps_every_expert_in_host_memory():
    all_gpu = place_tensors(Placement(), MOE, ["gpu:0"])
    cpu_moe = place_tensors(Placement(cpu_moe=True), MOE, ["gpu:0"])
    assert cpu_moe[HOST] - all_gpu[HOST] == 4 * EXPERTS
    assert all_gpu["gpu:0"] - cpu_moe["gpu:0"] == 4 * EXPERTS


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_n_cpu_moe_keeps_the_experts_of_the_first_n_layers(n):
    placed = place_tensors(Placement(n_cpu_moe=n), MOE, ["gpu:0"])
    base = place_tensors(Placement(), MOE, ["gpu:0"])
    assert placed[HOST] - base[HOST] == n * EXPERTS


def test_n_cpu_moe_1_does_not_catch_block_10_or_11():
    table = moe_table(12, 64, 32, 4, 100, 64, 64)
    facts = facts_for(table, n_layer=12, n_embd=64, n_head=1, n_head_kv=1, n_vocab=100,
                      n_ff=32, n_expert=4)
    one_layer = 3 * 64 * 32 * 4 * 2
    base = place_tensors(Placement(), facts, ["gpu:0"])[HOST]
    assert place_tensors(Placement(n_cpu_moe=2), facts, ["gpu:0"])[HOST] - base == 2 * one_layer


@pytest.mark.parametrize(("overrides", "moved"), [
    ([r"\.ffn_.*_exps\.=CPU"], 4 * EXPERTS),  # the pattern people copy from llama.cpp docs
    ([r"ffn_up_exps=CPU"], 4 * EXPERTS // 3),  # search, not a full match
    ([r"blk\.[0-1]\.ffn_(up|down)_exps=CPU"], 2 * 2 * EXPERTS // 3),
    ([r"blk\.0\.=CPU"], None),  # a whole layer
    ([r"^exps=CPU"], 0),  # anchored: matches nothing
])
def test_override_tensor_patterns_match_names_by_regex_search(overrides, moved):
    placed = place_tensors(Placement(override_tensor=overrides), MOE, ["gpu:0"])
    base = place_tensors(Placement(), MOE, ["gpu:0"])
    layer0 = sum(t.padded_nbytes for t in MOE_T if t.name.startswith("blk.0."))
    assert placed[HOST] - base[HOST] == (layer0 if moved is None else moved)


def test_the_first_matching_override_wins_and_can_name_another_gpu():
    rules = [r"blk\.3\.ffn_.*_exps=CUDA1", r"exps=CPU"]
    placed = place_tensors(Placement(override_tensor=rules), MOE, ["gpu:0", "gpu:1"])
    assert placed[HOST] - place_tensors(Placement(), MOE, ["gpu:0", "gpu:1"])[HOST] == (
        3 * EXPERTS)
    assert placed["gpu:1"] >= EXPERTS


def test_an_override_to_a_device_outside_the_group_is_an_error():
    with pytest.raises(ValueError, match="CUDA1 is not a device"):
        place_tensors(Placement(override_tensor=["exps=CUDA1"]), MOE, ["gpu:0"])
    with pytest.raises(ValueError, match="unknown buffer type"):
        place_tensors(Placement(override_tensor=["exps=NPU"]), MOE, ["gpu:0"])


def test_the_moe_compute_buffer_counts_the_active_experts_not_all():
    few = estimate_need(Placement(ctx_size=512), MOE, ["cpu"]).per_device["cpu"]
    many = estimate_need(Placement(ctx_size=512), facts_for(
        MOE_T, n_layer=4, n_embd=512, n_head=8, n_head_kv=2, n_vocab=1000, n_ff=256,
        n_expert=8, n_expert_used=8), ["cpu"]).per_device["cpu"]
    assert many.compute_buffer_bytes > few.compute_buffer_bytes
    assert many.weights_bytes == few.weights_bytes


# -- KV cache types, projector, compute ---------------------------------------------------------

@pytest.mark.parametrize(("k", "v", "bytes_per_32"), [
    ("f16", "f16", 64 + 64), ("q8_0", "q8_0", 34 + 34), ("q4_0", "q4_0", 18 + 18),
    ("q8_0", "f16", 34 + 64), ("f32", "f32", 128 + 128), ("q5_1", "iq4_nl", 24 + 18),
])
def test_a_quantized_kv_cache_is_sized_by_its_block_type(k, v, bytes_per_32):
    p = Placement(ctx_size=8192, cache_type_k=k, cache_type_v=v)
    assert kv_layer_bytes(DENSE, p) == 8192 * 256 // 32 * bytes_per_32


def test_an_unknown_cache_type_is_an_error():
    with pytest.raises(ValueError, match="unknown KV cache type 'q3_k'"):
        cache_type_bytes("q3_k", 32)


def test_parallel_sequences_each_get_a_padded_share_of_the_context():
    one = kv_layer_bytes(DENSE, Placement(ctx_size=4096, parallel=1))
    four = kv_layer_bytes(DENSE, Placement(ctx_size=4096, parallel=4))
    assert one == four  # 4 x 1024 cells
    odd = kv_layer_bytes(DENSE, Placement(ctx_size=1000, parallel=3))  # 334 → 512 each
    assert odd == 3 * 512 * 2 * 256 * 2


def test_a_vision_projector_is_charged_to_the_first_device_of_the_group():
    need = estimate_need(Placement(), DENSE, ["gpu:0", "gpu:1"], projector_bytes=600 * MIB)
    assert need.per_device["gpu:0"].projector_mb == 600
    assert need.per_device["gpu:1"].projector_mb == 0
    assert need.projector_mb == 600
    on_cpu = estimate_need(Placement(), DENSE, ["cpu"], projector_bytes=600 * MIB)
    assert on_cpu.per_device["cpu"].projector_mb == 600


def test_the_compute_buffer_grows_with_ubatch_and_without_flash_attention():
    sizes = [estimate_need(Placement(ctx_size=4096, ubatch_size=ub), DENSE, ["gpu:0"])
             .per_device["gpu:0"].compute_buffer_bytes for ub in (128, 512, 2048)]
    assert sizes == sorted(sizes)
    assert sizes[2] > 3 * sizes[1]
    no_fa = estimate_need(Placement(ctx_size=4096, flash_attn=False), DENSE, ["gpu:0"])
    fa = estimate_need(Placement(ctx_size=4096), DENSE, ["gpu:0"])
    # without flash attention the scores are materialised: n_kv * n_ub * 4 B * 16 heads
    gap = (no_fa.per_device["gpu:0"].compute_buffer_bytes
           - fa.per_device["gpu:0"].compute_buffer_bytes)
    assert gap >= 4096 * 512 * 4 * 16 - 20 * 1024 * 512 * 2


def test_a_batch_smaller_than_the_ubatch_caps_the_micro_batch():
    small = estimate_need(Placement(ctx_size=4096, batch_size=64), DENSE, ["cpu"])
    capped = estimate_need(Placement(ctx_size=4096, ubatch_size=64), DENSE, ["cpu"])
    assert small.compute_buffer_mb == capped.compute_buffer_mb


def test_on_the_cpu_everything_is_the_cpu_device_and_nothing_is_counted_twice():
    need = estimate_need(Placement(ctx_size=2048, gpu_layers=3, cpu_moe=True), MOE, ["cpu"])
    assert list(need.per_device) == ["cpu"]
    assert need.host_mb == 0
    assert need.per_device["cpu"].weights_bytes == sum(t.padded_nbytes for t in MOE_T)
    assert need.host_pageable_mb == need.per_device["cpu"].weights_mb


def test_components_add_up_to_the_totals():
    need = estimate_need(Placement(ctx_size=8192, gpu_layers=5, cache_type_k="q8_0"), DENSE,
                         ["gpu:0", "gpu:1"], projector_bytes=10 * MIB)
    parts = [*need.per_device.values(), need.host]
    assert need.total_mb >= sum(p.total_bytes for p in parts) / MIB
    assert need.kv_cache_mb == -(-sum(p.kv_cache_bytes for p in parts) // MIB)
    assert need.weights_gpu_mb + need.weights_host_mb >= sum(
        t.padded_nbytes for t in DENSE_T) // MIB


def test_without_a_tensor_table_the_file_is_spread_like_the_layers():
    bare = GGUFFacts("llama", 8, 1024, 16, 4, 4096, 900 * MIB, 32000, 2816)
    full = estimate_need(Placement(), bare, ["gpu:0"])
    half = estimate_need(Placement(gpu_layers=4), bare, ["gpu:0"])
    assert full.weights_gpu_mb == 900
    assert half.weights_gpu_mb == 400  # 4 of 9 (8 layers + output)


# -- host RAM ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("need", "available", "paging", "unpageable", "ok", "paged", "says"), [
    (30_000, 40_000, False, 1000, True, False, "needs 30000 MB of 40000 MB available"),
    (130_000, 40_000, False, 1000, False, False, "set allow_disk_paging: true"),
    (130_000, 40_000, True, 1000, True, True, "90000 MB of weights will be paged from disk"),
    (130_000, 40_000, True, 45_000, False, False, "even with disk paging"),
    (130_000, None, False, 0, True, False, "unknown"),
])
def test_host_fit(need, available, paging, unpageable, ok, paged, says):
    verdict = host_fit(need, available, paging, unpageable_mb=unpageable)
    assert (verdict.ok, verdict.paging) == (ok, paged)
    assert says in verdict.note


def test_with_no_layers_offloaded_the_main_gpu_still_reserves_a_compute_buffer():
    need = estimate_need(Placement(ctx_size=2048, gpu_layers=0), DENSE, ["gpu:0", "gpu:1"])
    assert need.per_device["gpu:0"].weights_bytes == 0
    assert need.per_device["gpu:0"].compute_buffer_bytes > 0  # op offload of prompt batches
    assert need.per_device["gpu:1"].total_bytes == 0
    assert need.host.weights_bytes == sum(t.padded_nbytes for t in DENSE_T)
