"""The architect tier: a 229B-class MoE with its experts in host RAM, on a 24 GB card.

The model is a GGUF header only (the tensor table of a MiniMax-M2-shaped model: 62 layers,
256 experts of 1536, 8 active, Q4_K), no weights: the estimate reads nothing else. With
--n-cpu-moe 62 the attention and KV cache fit the card; the ~126 GB of experts do not fit
40 GB of host RAM, so the placement is refused, unless the model allows paging its weights
from disk, when it fits and the verdict says so.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from rolemesh import cli
from rolemesh.memory_estimate import read_gguf_facts
from rolemesh.placement_memory import Placement, estimate_need, host_fit

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, HEAD = 62, 3072, 48, 8, 128
N_EXPERT, N_USED, N_FF_EXP, N_VOCAB = 256, 8, 1536, 200064
CARD_MB, HOST_AVAILABLE_MB, MARGIN = 24 * 1024, 40 * 1024, 0.9


def write_header_only(path: Path) -> Path:
    """A GGUF whose tensor table describes the model; the data section is left out."""
    writer = gguf.GGUFWriter(path, "minimax-m2")
    arch = "minimax-m2"
    for key, value in {"block_count": N_LAYER, "embedding_length": N_EMBD,
                       "attention.head_count": N_HEAD, "attention.head_count_kv": N_HEAD_KV,
                       "attention.key_length": HEAD, "attention.value_length": HEAD,
                       "context_length": 196608, "expert_count": N_EXPERT,
                       "expert_used_count": N_USED, "expert_feed_forward_length": N_FF_EXP,
                       "feed_forward_length": N_FF_EXP, "vocab_size": N_VOCAB}.items():
        writer.add_uint32(f"{arch}.{key}", value)

    def tensor(name: str, dims: tuple[int, ...], qtype: T) -> None:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        count = int(np.prod(dims))
        writer.add_tensor_info(name, tuple(reversed(dims)), np.dtype(np.float32),
                               count // block * size, raw_dtype=qtype)

    q, kv = N_HEAD * HEAD, N_HEAD_KV * HEAD
    tensor("token_embd.weight", (N_EMBD, N_VOCAB), T.Q4_K)
    for i in range(N_LAYER):
        b = f"blk.{i}."
        tensor(b + "attn_norm.weight", (N_EMBD,), T.F32)
        tensor(b + "attn_q.weight", (N_EMBD, q), T.Q4_K)
        tensor(b + "attn_k.weight", (N_EMBD, kv), T.Q4_K)
        tensor(b + "attn_v.weight", (N_EMBD, kv), T.Q6_K)
        tensor(b + "attn_output.weight", (q, N_EMBD), T.Q4_K)
        tensor(b + "ffn_norm.weight", (N_EMBD,), T.F32)
        tensor(b + "ffn_gate_inp.weight", (N_EMBD, N_EXPERT), T.F32)
        tensor(b + "ffn_gate_exps.weight", (N_EMBD, N_FF_EXP, N_EXPERT), T.Q4_K)
        tensor(b + "ffn_up_exps.weight", (N_EMBD, N_FF_EXP, N_EXPERT), T.Q4_K)
        tensor(b + "ffn_down_exps.weight", (N_FF_EXP, N_EMBD, N_EXPERT), T.Q6_K)
    tensor("output_norm.weight", (N_EMBD,), T.F32)
    tensor("output.weight", (N_EMBD, N_VOCAB), T.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def architect(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_header_only(tmp_path_factory.mktemp("architect") / "minimax-m2-q4_k.gguf")


PLACEMENT = Placement(ctx_size=32768, n_cpu_moe=N_LAYER, cache_type_k="q8_0",
                      cache_type_v="q8_0")


def test_the_header_describes_a_229b_model_in_a_file_of_kilobytes(architect):
    facts = read_gguf_facts(architect)
    params = sum(t.n_elements for t in facts.tensors)
    assert 228e9 < params < 231e9
    assert architect.stat().st_size < 200_000
    assert (facts.n_expert, facts.n_expert_used, facts.n_ff_expert) == (256, 8, 1536)


def test_experts_in_host_ram_leave_attention_and_kv_on_a_24_gb_card(architect):
    need = estimate_need(PLACEMENT, read_gguf_facts(architect), ["gpu:0"])
    card = need.per_device["gpu:0"]
    assert card.total_mb <= CARD_MB * MARGIN
    assert 1_500 < card.weights_mb < 3_000  # attention, router, output: no experts
    # 62 layers x 32768 cells x 1024 wide x (K + V) at q8_0 (34 bytes per 32)
    assert card.kv_cache_bytes == 62 * 32768 * 2 * 1024 // 32 * 34
    assert need.weights_host_mb > 120_000  # every expert stays in host memory
    assert need.host_pageable_mb == need.weights_host_mb


def test_without_disk_paging_the_host_part_is_refused_with_the_breakdown(architect):
    need = estimate_need(PLACEMENT, read_gguf_facts(architect), ["gpu:0"])
    verdict = host_fit(need.host_mb, HOST_AVAILABLE_MB, allow_disk_paging=False,
                       unpageable_mb=need.host_mb - need.host_pageable_mb)
    assert not verdict.ok
    assert f"needs {need.host_mb} MB, only {HOST_AVAILABLE_MB} MB available" in verdict.note
    assert "allow_disk_paging" in verdict.note


def test_with_disk_paging_it_fits_and_the_verdict_says_weights_page_from_disk(architect):
    need = estimate_need(PLACEMENT, read_gguf_facts(architect), ["gpu:0"])
    verdict = host_fit(need.host_mb, HOST_AVAILABLE_MB, allow_disk_paging=True,
                       unpageable_mb=need.host_mb - need.host_pageable_mb)
    assert verdict.ok
    assert verdict.paging
    assert "paged from disk through mmap" in verdict.note


ARGS = ["check-fit", "--ctx-size", "32768", "--n-cpu-moe", str(N_LAYER), "--cache-type-k",
        "q8_0", "--cache-type-v", "q8_0", "--device-mb", str(CARD_MB),
        "--host-mb", str(HOST_AVAILABLE_MB)]


def test_check_fit_refuses_it_and_shows_where_each_part_goes(architect, capsys):
    assert cli.main([*ARGS[:1], str(architect), *ARGS[1:]]) == 3
    out = capsys.readouterr().out
    assert "256 experts (8 active)" in out
    assert "WEIGHTS" in out
    assert "KV CACHE" in out
    assert "gpu:0: needs" in out
    assert "fits" in out.split("gpu:0: needs")[1].splitlines()[0]
    assert "host RAM" in out
    assert "set allow_disk_paging: true" in out
    assert "DOES NOT FIT" in out


def test_check_fit_with_disk_paging_fits(architect, capsys):
    assert cli.main([*ARGS[:1], str(architect), *ARGS[1:], "--allow-disk-paging"]) == 0
    out = capsys.readouterr().out
    assert "paged from disk through mmap" in out
    assert "DOES NOT FIT" not in out


def test_all_experts_on_the_card_do_not_fit_it(architect, capsys):
    args = [a for a in ARGS if a not in ("--n-cpu-moe", str(N_LAYER))]
    assert cli.main([*args[:1], str(architect), *args[1:], "--allow-disk-paging"]) == 3
    assert "gpu:0: needs" in capsys.readouterr().out


@pytest.mark.parametrize(("paging", "fits"), [(True, True), (False, False)])
def test_an_architect_tier_node_config_is_judged_by_its_allow_disk_paging(
        architect, paging, fits):
    from node_agent.config import NodeAgentConfig
    from node_agent.memory_charge import read_model_memory
    from rolemesh.config_loading import load_config

    text = f"""
backend: cuda
models:
  - model_id: minimax-m2-q4_k
    path: {architect}
    roles: [architect]
    ctx_size: 32768
    n_cpu_moe: {N_LAYER}
    cache_type_k: q8_0
    cache_type_v: q8_0
    allow_disk_paging: {str(paging).lower()}
"""
    model = load_config(text, NodeAgentConfig, source="node.yaml").models[0]
    need = read_model_memory(model).need(["gpu:0"])
    verdict = host_fit(need.host_mb, HOST_AVAILABLE_MB, model.allow_disk_paging,
                       unpageable_mb=need.host_mb - need.host_pageable_mb)
    assert need.per_device_mb["gpu:0"] <= CARD_MB * MARGIN
    assert (verdict.ok, verdict.paging) == (fits, fits)
    assert ("paged from disk" if fits else "set allow_disk_paging: true") in verdict.note
