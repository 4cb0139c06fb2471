"""Tiny but real llama-architecture GGUF models that llama.cpp loads and generates from.

Each model can only ever write characters from its own charset, so a test can tell from
the text which model answered. The trick, in the weights rather than in sampling:

- embedding dimension 0 of every token is a constant K, and no layer writes to it (row 0
  of every `attn_output` and `ffn_down` is zero), so after the final RMS norm that
  dimension is a large positive number whatever the input;
- `output.weight` gives every token outside the charset a strongly negative weight on
  dimension 0 and nothing else, and every allowed token a zero weight there plus random
  weights elsewhere (which is where the variety between allowed tokens comes from).

Disallowed logits sit hundreds of units below the allowed ones, far past any sampler's cut-off,
so not even EOS is ever chosen: generation runs until max_tokens.

The tokenizer is byte-level `gpt2` (GPT-2's bytes_to_unicode mapping, one token per byte)
plus ChatML's special tokens, with a ChatML chat template. Nothing is ever downloaded;
the sizes are parameters, so a few-hundred-MB model for benchmarks is written in seconds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import numpy.typing as npt

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
SYMBOLS = "!#$%&*+=?@^~"
PRESETS = {"letters": LETTERS, "digits": DIGITS, "symbols": SYMBOLS}

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_END)
N_VOCAB = 256 + len(SPECIAL_TOKENS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TensorType = Literal["f32", "f16"]
_Array = npt.NDArray[np.float32]


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, which llama.cpp's BPE expects."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def allowed_token_ids(charset: str) -> list[int]:
    """The byte tokens a model with this charset may emit (token id == byte value)."""
    if not charset:
        raise ValueError("charset is empty: a model must be able to write something")
    bad = sorted({c for c in charset if not 0x20 <= ord(c) <= 0x7E})
    if bad:
        # One printable ASCII byte per character keeps every output valid UTF-8.
        raise ValueError(f"charset may hold only printable ASCII characters, not {bad!r}")
    return sorted({ord(c) for c in charset})


@dataclass(frozen=True)
class _Shape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_expert: int = 0  # 0: a dense model; otherwise a Mixtral-style MoE in the llama arch
    n_expert_used: int = 0
    n_vocab: int = N_VOCAB  # above N_VOCAB: padding tokens that are never written

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def default_n_ff(n_embd: int) -> int:
    """llama's 8/3 of the width, rounded up to a multiple of 32."""
    return math.ceil(8 * n_embd / 3 / 32) * 32


def default_n_head(n_embd: int) -> int:
    """64-wide heads like most llamas, but at least 4 so tiny models still have several."""
    return max(4, n_embd // 64)


def write_tiny_model(path: str | Path, *, charset: str, n_embd: int = 64, n_layer: int = 2,
                     n_head: int | None = None, n_head_kv: int | None = None,
                     n_ff: int | None = None, context_length: int = 2048, seed: int = 0,
                     tensor_type: TensorType = "f16", n_expert: int = 0,
                     n_expert_used: int = 2, n_vocab: int = N_VOCAB) -> Path:
    """Write a llama GGUF that can only generate characters from `charset`; returns its path.

    The file is written tensor by tensor, so memory stays small even for big sizes, and
    the same arguments always give the same bytes. n_head defaults to one head per 64 of
    width (at least 4), n_head_kv to n_head, n_ff to 8/3 of the width.

    n_expert > 0 writes a mixture of experts the way Mixtral is stored in the llama
    architecture: a router `ffn_gate_inp` and stacked `ffn_{gate,up,down}_exps` tensors of
    n_expert experts each n_ff wide, n_expert_used of them active per token. These are the
    tensors llama.cpp's --cpu-moe / --n-cpu-moe keep in host memory.
    """
    allowed = allowed_token_ids(charset)
    n_head = n_head or default_n_head(n_embd)
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    kv_heads = n_head if n_head_kv is None else n_head_kv
    if kv_heads < 1 or n_head % kv_heads:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({kv_heads})")
    if n_layer < 1 or context_length < 1:
        raise ValueError("n_layer and context_length must be positive")
    if n_expert < 0 or (n_expert and not 1 <= n_expert_used <= n_expert):
        raise ValueError(f"n_expert_used ({n_expert_used}) must be between 1 and n_expert "
                         f"({n_expert})")
    if n_vocab < N_VOCAB:
        raise ValueError(f"n_vocab ({n_vocab}) must be at least {N_VOCAB}, the byte vocabulary")
    shape = _Shape(n_embd, n_layer, n_head, kv_heads, n_ff or default_n_ff(n_embd),
                   n_expert, n_expert_used if n_expert else 0, n_vocab)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(out, "llama")
    try:
        _add_metadata(writer, shape, charset, context_length, tensor_type, out.stem)
        tensors = list(_tensor_plan(shape, allowed, tensor_type, np.random.default_rng(seed)))
        for name, numpy_shape, dtype, _ in tensors:
            nbytes = math.prod(numpy_shape) * np.dtype(dtype).itemsize
            writer.add_tensor_info(name, numpy_shape, np.dtype(dtype), nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, _, make in tensors:
            writer.write_tensor_data(make())
    finally:
        writer.close()
    return out


def _add_metadata(writer: gguf.GGUFWriter, shape: _Shape, charset: str, context_length: int,
                  tensor_type: TensorType, stem: str) -> None:
    writer.add_name(f"rolemesh-tiny-{stem}")
    writer.add_string("rolemesh.tiny.charset", charset)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if tensor_type == "f16"
                         else gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(shape.n_vocab)
    writer.add_context_length(context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    if shape.n_expert:
        writer.add_expert_count(shape.n_expert)
        writer.add_expert_used_count(shape.n_expert_used)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(10000.0)

    byte_tokens = bytes_to_unicode()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")  # llama.cpp refuses "gpt2" here; any works for bytes
    padding = [f"<|pad_{i}|>" for i in range(shape.n_vocab - N_VOCAB)]
    writer.add_token_list([byte_tokens[b] for b in range(256)] + list(SPECIAL_TOKENS)
                          + padding)
    writer.add_token_types([gguf.TokenType.NORMAL] * 256
                           + [gguf.TokenType.CONTROL] * (len(SPECIAL_TOKENS) + len(padding)))
    # llama.cpp refuses a gpt2 vocab without merges; one merge whose result is not in the
    # vocab is harmless (the tokenizer falls back to the byte tokens).
    writer.add_token_merges([f"{byte_tokens[0x0A]} {byte_tokens[0x0A]}"])
    writer.add_bos_token_id(256 + SPECIAL_TOKENS.index(BOS_TOKEN))
    writer.add_eos_token_id(256 + SPECIAL_TOKENS.index(IM_END))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


_Plan = tuple[str, tuple[int, ...], type[np.floating], Callable[[], npt.NDArray[np.floating]]]


def _tensor_plan(shape: _Shape, allowed: list[int], tensor_type: TensorType,
                 rng: np.random.Generator) -> Iterator[_Plan]:
    """Each tensor's name, numpy shape (ggml's reversed), dtype and a maker called in order.

    The makers draw from one generator, so they must run in the order listed; that is
    what makes a seed reproducible while only one tensor is in memory at a time.
    """
    matrix_dtype: type[np.floating] = np.float16 if tensor_type == "f16" else np.float32
    n, hd = shape.n_embd, shape.head_dim

    def normal(rows: int, cols: int, std: float) -> _Array:
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)

    def matrix(make: Callable[[], _Array]) -> Callable[[], npt.NDArray[np.floating]]:
        return lambda: make().astype(matrix_dtype)

    def ones() -> npt.NDArray[np.floating]:
        return np.ones(n, dtype=np.float32)

    def embeddings() -> _Array:
        emb = normal(shape.n_vocab, n, 1.0)
        emb[:, 0] = 2.0 * math.sqrt(n)  # the constant component the output bias reads
        return emb

    def residual_read(rows: int) -> Callable[[], _Array]:
        return lambda: normal(rows, n, n**-0.5)

    def residual_write(rows: int, cols: int) -> Callable[[], _Array]:
        def make() -> _Array:
            w = normal(rows, cols, 0.1 / math.sqrt(cols))
            w[0, :] = 0.0  # no layer may disturb the constant component
            return w
        return make

    def experts(rows: int, cols: int, std: float, *, writes: bool) -> Callable[[], _Array]:
        def make() -> _Array:
            w = rng.standard_normal((shape.n_expert, rows, cols), dtype=np.float32)
            w *= np.float32(std)
            if writes:
                w[:, 0, :] = 0.0  # no expert may disturb the constant component either
            return w
        return make

    def output() -> _Array:
        # After the final RMS norm, dimension 0 is about 0.9·sqrt(n) and the rest about 0.45.
        w = normal(shape.n_vocab, n, 3.0 / math.sqrt(n))
        w[:, 0] = 0.0
        banned = np.ones(shape.n_vocab, dtype=bool)
        banned[allowed] = False
        w[banned, :] = 0.0
        w[banned, 0] = -1000.0 / math.sqrt(n)  # about -900 logits: never, at any temperature
        return w

    yield "token_embd.weight", (shape.n_vocab, n), matrix_dtype, matrix(embeddings)
    q, kv, ff = shape.n_head * hd, shape.n_head_kv * hd, shape.n_ff
    for i in range(shape.n_layer):
        blk = f"blk.{i}."
        yield blk + "attn_norm.weight", (n,), np.float32, ones
        yield blk + "attn_q.weight", (q, n), matrix_dtype, matrix(residual_read(q))
        yield blk + "attn_k.weight", (kv, n), matrix_dtype, matrix(residual_read(kv))
        yield blk + "attn_v.weight", (kv, n), matrix_dtype, matrix(residual_read(kv))
        yield blk + "attn_output.weight", (n, q), matrix_dtype, matrix(residual_write(n, q))
        yield blk + "ffn_norm.weight", (n,), np.float32, ones
        if shape.n_expert:
            ne = shape.n_expert
            # The router stays f32 like llama.cpp's converters write it.
            yield blk + "ffn_gate_inp.weight", (ne, n), np.float32, residual_read(ne)
            read, write = n**-0.5, 0.1 / math.sqrt(ff)
            yield (blk + "ffn_gate_exps.weight", (ne, ff, n), matrix_dtype,
                   matrix(experts(ff, n, read, writes=False)))
            yield (blk + "ffn_up_exps.weight", (ne, ff, n), matrix_dtype,
                   matrix(experts(ff, n, read, writes=False)))
            yield (blk + "ffn_down_exps.weight", (ne, n, ff), matrix_dtype,
                   matrix(experts(n, ff, write, writes=True)))
            continue
        yield blk + "ffn_gate.weight", (ff, n), matrix_dtype, matrix(residual_read(ff))
        yield blk + "ffn_up.weight", (ff, n), matrix_dtype, matrix(residual_read(ff))
        yield blk + "ffn_down.weight", (n, ff), matrix_dtype, matrix(residual_write(n, ff))
    yield "output_norm.weight", (n,), np.float32, ones
    yield "output.weight", (shape.n_vocab, n), matrix_dtype, matrix(output)


def write_tiny_projector(path: str | Path, *, text_n_embd: int, n_embd: int = 256,
                         n_layer: int = 2, n_head: int = 4, n_ff: int = 1024,
                         image_size: int = 224, patch_size: int = 14, seed: int = 0) -> Path:
    """Write a LLaVA-style vision projector (mmproj, `clip` with an `mlp` projector) that
    llama-server loads with --mmproj beside a tiny model of width text_n_embd.

    A ViT of n_layer blocks over (image_size / patch_size)^2 patches plus a class token,
    then two linear layers to the text model's width. Random weights: images are accepted
    and become image tokens, but the text model still writes only its own charset.
    """
    if image_size % patch_size or n_embd % n_head:
        raise ValueError("image_size must be a multiple of patch_size, n_embd of n_head")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out, "clip")
    try:
        writer.add_bool("clip.has_vision_encoder", True)
        writer.add_string("clip.projector_type", "mlp")
        for key, value in {"image_size": image_size, "patch_size": patch_size,
                           "embedding_length": n_embd, "feed_forward_length": n_ff,
                           "block_count": n_layer, "attention.head_count": n_head,
                           "projection_dim": text_n_embd}.items():
            writer.add_uint32(f"clip.vision.{key}", value)
        writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
        writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
        writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
        writer.add_bool("clip.use_gelu", True)

        def add(name: str, shape: tuple[int, ...], dtype: type[np.floating]) -> None:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            writer.add_tensor(name, values.astype(dtype))

        f16, f32 = np.float16, np.float32
        add("v.patch_embd.weight", (n_embd, 3, patch_size, patch_size), f16)
        add("v.class_embd", (n_embd,), f32)
        add("v.position_embd.weight", ((image_size // patch_size) ** 2 + 1, n_embd), f16)
        add("v.pre_ln.weight", (n_embd,), f32)
        add("v.pre_ln.bias", (n_embd,), f32)
        for i in range(n_layer):
            blk = f"v.blk.{i}."
            for norm in ("ln1", "ln2"):
                add(blk + norm + ".weight", (n_embd,), f32)
                add(blk + norm + ".bias", (n_embd,), f32)
            for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
                add(blk + proj + ".weight", (n_embd, n_embd), f16)
                add(blk + proj + ".bias", (n_embd,), f32)
            add(blk + "ffn_up.weight", (n_ff, n_embd), f16)
            add(blk + "ffn_up.bias", (n_ff,), f32)
            add(blk + "ffn_down.weight", (n_embd, n_ff), f16)
            add(blk + "ffn_down.bias", (n_embd,), f32)
        add("mm.0.weight", (text_n_embd, n_embd), f16)
        add("mm.0.bias", (text_n_embd,), f32)
        add("mm.2.weight", (text_n_embd, text_n_embd), f16)
        add("mm.2.bias", (text_n_embd,), f32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out


def write_demo_models(directory: str | Path) -> dict[str, Path]:
    """letters.gguf, digits.gguf and symbols.gguf in `directory`: three distinguishable models."""
    root = Path(directory)
    return {name: write_tiny_model(root / f"{name}.gguf", charset=chars, seed=i + 1)
            for i, (name, chars) in enumerate(PRESETS.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rolemesh.tiny_gguf",
        description="Write a tiny llama GGUF that only writes characters from a charset.")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--charset", default="letters",
                        help="letters, digits, symbols, or the literal characters to allow")
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=None)
    parser.add_argument("--n-head-kv", type=int, default=None)
    parser.add_argument("--n-ff", type=int, default=None)
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-type", choices=["f16", "f32"], default="f16")
    parser.add_argument("--n-expert", type=int, default=0, help="0: dense; N: a MoE")
    parser.add_argument("--n-vocab", type=int, default=N_VOCAB)
    parser.add_argument("--n-expert-used", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        path = write_tiny_model(
            args.out, charset=PRESETS.get(args.charset, args.charset), n_embd=args.n_embd,
            n_layer=args.n_layer, n_head=args.n_head, n_head_kv=args.n_head_kv,
            n_ff=args.n_ff, context_length=args.context_length, seed=args.seed,
            tensor_type=args.tensor_type, n_expert=args.n_expert,
            n_expert_used=args.n_expert_used, n_vocab=args.n_vocab)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
