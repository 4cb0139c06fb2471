"""The tiny GGUF writer: valid files llama.cpp can read, with a charset baked into the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from rolemesh.tiny_gguf import (
    DIGITS,
    LETTERS,
    N_VOCAB,
    SPECIAL_TOKENS,
    SYMBOLS,
    bytes_to_unicode,
    default_n_ff,
    main,
    write_demo_models,
    write_tiny_model,
)


def read(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def tensors(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def layer_names(i: int) -> set[str]:
    return {f"blk.{i}.{part}.weight" for part in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
        "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}


def test_the_file_is_a_gguf_with_llama_keys_a_byte_vocab_and_chatml(tmp_path):
    reader = read(write_tiny_model(tmp_path / "m.gguf", charset=LETTERS, context_length=1024))
    assert field(reader, "general.architecture") == "llama"
    expected = {"llama.context_length": 1024, "llama.embedding_length": 64,
                "llama.block_count": 2, "llama.feed_forward_length": 192,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4,
                "llama.rope.dimension_count": 16, "llama.vocab_size": N_VOCAB}
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "default"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == N_VOCAB
    assert tokens[ord("a")] == "a"
    assert tokens[ord(" ")] == "Ġ"  # GPT-2's printable stand-in for a space
    assert tokens[256:] == list(SPECIAL_TOKENS)
    types = field(reader, "tokenizer.ggml.token_type")
    assert set(types[:256]) == {gguf.TokenType.NORMAL}
    assert set(types[256:]) == {gguf.TokenType.CONTROL}
    assert len(field(reader, "tokenizer.ggml.merges")) >= 1
    assert tokens[field(reader, "tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")
    assert field(reader, "rolemesh.tiny.charset") == LETTERS


def test_every_llama_tensor_is_there_in_ggml_shape_order(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", charset=DIGITS, n_embd=128, n_layer=3,
                            n_head=8, n_head_kv=2, n_ff=256)
    found = tensors(read(path))
    expected_names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(3):
        expected_names |= layer_names(i)
    assert set(found) == expected_names
    shapes = {name: [int(d) for d in t.shape] for name, t in found.items()}
    # ggml's ne order: the first number is the row length (the numpy shape reversed).
    assert shapes["token_embd.weight"] == [128, N_VOCAB]
    assert shapes["output.weight"] == [128, N_VOCAB]
    assert shapes["blk.0.attn_q.weight"] == [128, 128]
    assert shapes["blk.0.attn_k.weight"] == [128, 32]  # 2 KV heads of 16
    assert shapes["blk.0.attn_v.weight"] == [128, 32]
    assert shapes["blk.0.attn_output.weight"] == [128, 128]
    assert shapes["blk.2.ffn_gate.weight"] == [128, 256]
    assert shapes["blk.2.ffn_down.weight"] == [256, 128]
    assert shapes["output_norm.weight"] == [128]


@pytest.mark.parametrize(("tensor_type", "matrix_type"), [
    ("f16", gguf.GGMLQuantizationType.F16),
    ("f32", gguf.GGMLQuantizationType.F32),
])
def test_matrices_take_the_tensor_type_and_norms_stay_f32(tmp_path, tensor_type, matrix_type):
    found = tensors(read(write_tiny_model(tmp_path / "m.gguf", charset=DIGITS,
                                          tensor_type=tensor_type)))
    assert found["blk.0.attn_q.weight"].tensor_type == matrix_type
    assert found["output.weight"].tensor_type == matrix_type
    assert found["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("charset", [LETTERS, DIGITS, SYMBOLS, "xyz ", "A"])
def test_only_the_charset_can_win_whatever_the_layers_add(tmp_path, charset):
    found = tensors(read(write_tiny_model(tmp_path / "m.gguf", charset=charset, seed=5)))
    embd = np.asarray(found["token_embd.weight"].data, dtype=np.float32)
    out = np.asarray(found["output.weight"].data, dtype=np.float32)
    # No layer writes to dimension 0, so it keeps the embedding's constant value...
    assert np.all(embd[:, 0] == embd[0, 0])
    for name in ("blk.0.attn_output.weight", "blk.1.ffn_down.weight"):
        assert not np.any(np.asarray(found[name].data)[0, :])
    # ...and whatever the layers add elsewhere, the output head bans the other bytes.
    rng = np.random.default_rng(0)
    hidden = embd + rng.normal(0, 2.0, embd.shape).astype(np.float32) * (np.arange(64) > 0)
    normed = hidden / np.sqrt(np.mean(hidden**2, axis=1, keepdims=True) + 1e-5)
    logits = normed @ out.T
    allowed = sorted({ord(c) for c in charset})
    banned = [t for t in range(N_VOCAB) if t not in allowed]
    assert logits[:, allowed].min() - logits[:, banned].max() > 20


def test_the_same_arguments_give_the_same_bytes_and_other_seeds_or_charsets_do_not(tmp_path):
    def write(folder: str, **kw: Any) -> bytes:
        args: dict[str, Any] = {"charset": LETTERS, "seed": 1, **kw}
        return write_tiny_model(tmp_path / folder / "m.gguf", **args).read_bytes()

    first = write("a")
    assert write("b") == first
    assert write("c", seed=2) != first
    assert write("d", charset=DIGITS) != first


def test_sizes_are_parametric_and_a_100mb_model_is_written_quickly(tmp_path):
    path = write_tiny_model(tmp_path / "big.gguf", charset=LETTERS, n_embd=768, n_layer=8)
    assert 100e6 < path.stat().st_size < 130e6
    reader = read(path)
    assert field(reader, "llama.attention.head_count") == 12  # 64-wide heads by default
    assert field(reader, "llama.feed_forward_length") == 2048


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"charset": ""}, "charset is empty"),
    ({"charset": "abcé"}, "printable ASCII"),
    ({"charset": "a\tb"}, "printable ASCII"),
    ({"charset": "a", "n_embd": 60, "n_head": 8}, "multiple of n_head"),
    ({"charset": "a", "n_head": 4, "n_head_kv": 3}, "multiple of n_head_kv"),
    ({"charset": "a", "n_layer": 0}, "must be positive"),
])
def test_bad_arguments_are_refused_with_a_reason(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_tiny_model(tmp_path / "m.gguf", **kwargs)
    assert not (tmp_path / "m.gguf").exists()


def test_demo_models_are_three_distinct_files(tmp_path):
    models = write_demo_models(tmp_path / "models")
    assert sorted(models) == ["digits", "letters", "symbols"]
    assert models["digits"] == tmp_path / "models" / "digits.gguf"
    assert len({p.read_bytes() for p in models.values()}) == 3


@pytest.mark.parametrize(("charset_arg", "expected"), [
    ("digits", DIGITS), ("symbols", SYMBOLS), ("letters", LETTERS), ("xyz", "xyz")])
def test_the_cli_takes_a_preset_name_or_literal_characters(tmp_path, capsys, charset_arg,
                                                           expected):
    out = tmp_path / "cli.gguf"
    assert main([str(out), "--charset", charset_arg, "--n-embd", "32", "--n-layer", "1"]) == 0
    reader = read(out)
    assert field(reader, "rolemesh.tiny.charset") == expected
    assert field(reader, "llama.embedding_length") == 32
    assert str(out) in capsys.readouterr().out


def test_the_cli_reports_a_bad_charset_as_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "x.gguf"), "--charset", "ü"])
    assert exited.value.code == 2
    assert "printable ASCII" in capsys.readouterr().err


def test_gpt2_byte_map_is_a_bijection_that_keeps_printable_ascii():
    mapping = bytes_to_unicode()
    assert len(set(mapping.values())) == 256
    assert all(mapping[b] == chr(b) for b in range(ord("!"), ord("~") + 1))
    assert mapping[ord("\n")] == "Ċ"


@pytest.mark.parametrize(("n_embd", "n_ff"), [(64, 192), (768, 2048), (1024, 2752), (32, 96)])
def test_default_feed_forward_is_eight_thirds_rounded_up_to_32(n_embd, n_ff):
    assert default_n_ff(n_embd) == n_ff
