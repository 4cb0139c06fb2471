"""How much memory a GGUF model needs under llama-server: read its header, then estimate.

The header is parsed here rather than with gguf.GGUFReader, which maps every tensor and
turns each vocabulary string into its own numpy array: 6.7 s for a header holding a
152k-token vocabulary, against 30 ms for walking just the key/value section here.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from rolemesh.gguf_tensors import TensorInfo, parse_tensor_infos

GGUF_MAGIC = b"GGUF"
MIB = 1024 * 1024

# What llama-server uses unless told otherwise; the estimate assumes these defaults.
N_UBATCH = 512
CTX_PAD = 256  # each sequence's context is rounded up to a multiple of this
COMPUTE_BASE_BYTES = 8 * MIB

# Sanity bounds, so a corrupt or hostile header fails fast instead of looping for ever.
_MAX_KV_COUNT = 1_000_000
_MAX_KEPT_ARRAY = 4096  # per-layer figures are kept; vocabularies are only counted

_SCALARS: dict[int, tuple[str, int]] = {  # GGUF value type → struct code, size
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}
_STRING, _ARRAY = 8, 9

Value = int | float | bool | str | tuple[int | float | bool | str, ...] | None


class NotAGGUFFile(ValueError):
    """The file is missing, unreadable, not a GGUF, or its header is corrupt."""


@dataclass(frozen=True)
class GGUFFacts:
    """The figures of a model that decide its memory need; None where the file does not say.

    Per-layer figures stored as arrays (some hybrid and sliding-window models do this) are
    reduced to their largest value, so estimates from them err on the safe, larger side.
    """

    architecture: str
    n_layer: int | None
    n_embd: int | None
    n_head: int | None
    n_head_kv: int | None
    context_length: int | None
    file_size_bytes: int  # all split parts together, for a model split into several files
    n_vocab: int | None = None
    n_ff: int | None = None
    key_length: int | None = None  # per head, where it differs from n_embd / n_head
    value_length: int | None = None
    n_expert: int | None = None  # a mixture of experts: experts per layer, and active ones
    n_expert_used: int | None = None
    n_ff_expert: int | None = None  # an expert's width, where it differs from n_ff
    # The tensor table (names, shapes, types), for placing each tensor on a device.
    tensors: tuple[TensorInfo, ...] = field(default=(), compare=False, repr=False)


class _Header:
    """A bounded little/big-endian reader over a GGUF file mapped into memory."""

    def __init__(self, data: mmap.mmap | bytes, path: Path) -> None:
        self._data = data
        self._size = len(data)
        self._path = path
        self.pos = 0
        self.endian = "<"

    def fail(self, problem: str) -> NotAGGUFFile:
        return NotAGGUFFile(f"{self._path}: {problem}")

    def read(self, n: int) -> bytes:
        if n > self._size - self.pos:
            raise self.fail("the GGUF header is truncated")
        data = self._data[self.pos:self.pos + n]
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if n > self._size - self.pos:
            raise self.fail("the GGUF header is truncated")
        self.pos += n

    def scalar(self, code: str, size: int) -> int | float | bool:
        if size > self._size - self.pos:
            raise self.fail("the GGUF header is truncated")
        value: int | float | bool = struct.unpack_from(self.endian + code, self._data,
                                                       self.pos)[0]
        self.pos += size
        return value

    def u32(self) -> int:
        return int(self.scalar("I", 4))

    def u64(self) -> int:
        return int(self.scalar("Q", 8))

    def string(self) -> str:
        return self.read(self.u64()).decode("utf-8", errors="replace")

    def value(self, value_type: int) -> tuple[Value, int | None]:
        """A value and, for an array, its length (arrays too long to keep come back None)."""
        if value_type in _SCALARS:
            return self.scalar(*_SCALARS[value_type]), None
        if value_type == _STRING:
            return self.string(), None
        if value_type == _ARRAY:
            return self.array()
        raise self.fail(f"unknown GGUF value type {value_type}")

    def array(self) -> tuple[Value, int]:
        item_type, count = self.u32(), self.u64()
        if count > self._size:
            raise self.fail(f"an array of {count} items is longer than the file")
        if count > _MAX_KEPT_ARRAY or item_type in (_STRING, _ARRAY):
            self._skip_items(item_type, count)
            return None, count
        items = [self.value(item_type)[0] for _ in range(count)]
        return tuple(v for v in items if v is not None and not isinstance(v, tuple)), count

    def _skip_items(self, item_type: int, count: int) -> None:
        if item_type in _SCALARS:
            self.skip(count * _SCALARS[item_type][1])
        elif item_type == _STRING:
            # The hot loop for a 150k-token vocabulary: kept to one unpack per string.
            unpack, data, pos = struct.Struct(self.endian + "Q").unpack_from, self._data, self.pos
            for _ in range(count):
                pos += 8 + unpack(data, pos)[0]
                if pos > self._size:
                    raise self.fail("the GGUF header is truncated")
            self.pos = pos
        elif item_type == _ARRAY:
            for _ in range(count):
                self.array()
        else:
            raise self.fail(f"unknown GGUF value type {item_type}")


def read_gguf_metadata(path: str | Path) -> tuple[dict[str, Value], dict[str, int]]:
    """The key/value section of a GGUF: small values, plus every array's length by key.

    Arrays longer than a few thousand items (vocabularies, merges) and arrays of strings
    are skipped over, not read: their value is None and their length is in the second dict.
    """
    values, lengths, _ = read_gguf_header(path)
    return values, lengths


def read_gguf_header(path: str | Path) -> tuple[dict[str, Value], dict[str, int],
                                                 tuple[TensorInfo, ...]]:
    """The key/value section as read_gguf_metadata gives it, and the tensor table."""
    file = Path(path)
    try:
        with file.open("rb") as stream:
            if file.stat().st_size < len(GGUF_MAGIC) + 4:
                raise NotAGGUFFile(f"{file}: not a GGUF file (too short to hold a header)")
            with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(_Header(data, file))
    except OSError as exc:
        raise NotAGGUFFile(f"{file}: cannot be read: {exc.strerror or exc}") from exc


def _parse(header: _Header) -> tuple[dict[str, Value], dict[str, int],
                                     tuple[TensorInfo, ...]]:
    if header.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
        raise header.fail("not a GGUF file (it does not start with the GGUF magic bytes)")
    version = header.u32()
    if version > 0xFFFF:  # written on a big-endian machine: every number is byte-swapped
        header.endian = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise header.fail(f"GGUF version {version} is not supported (only 2 and 3)")
    tensor_count = header.u64()
    kv_count = header.u64()
    if kv_count > _MAX_KV_COUNT:
        raise header.fail(f"the header claims {kv_count} keys: corrupt")
    values: dict[str, Value] = {}
    lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key = header.string()
        values[key], length = header.value(header.u32())
        if length is not None:
            lengths[key] = length
    return values, lengths, parse_tensor_infos(header, tensor_count)


def read_gguf_facts(path: str | Path) -> GGUFFacts:
    """The figures of a GGUF model that decide its memory need (reads only the header)."""
    file = Path(path)
    values, lengths, tensors = read_gguf_header(file)
    arch = values.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise NotAGGUFFile(f"{file}: the GGUF has no general.architecture key")

    def figure(key: str) -> int | None:
        return _positive_int(values.get(f"{arch}.{key}"))

    n_vocab = figure("vocab_size") or lengths.get("tokenizer.ggml.tokens") or None
    return GGUFFacts(
        architecture=arch,
        n_layer=figure("block_count"),
        n_embd=figure("embedding_length"),
        n_head=figure("attention.head_count"),
        # llama.cpp's own fallback: no separate KV head count means one per query head.
        n_head_kv=figure("attention.head_count_kv") or figure("attention.head_count"),
        context_length=figure("context_length"),
        file_size_bytes=_model_size_bytes(file, values),
        n_vocab=n_vocab,
        n_ff=figure("feed_forward_length"),
        key_length=figure("attention.key_length"),
        value_length=figure("attention.value_length"),
        n_expert=figure("expert_count"),
        n_expert_used=figure("expert_used_count"),
        n_ff_expert=figure("expert_feed_forward_length"),
        tensors=tensors,
    )


def _positive_int(value: Value) -> int | None:
    if isinstance(value, tuple):  # a per-layer figure: the largest layer decides
        numbers = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        value = max(numbers, default=None)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


_SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _model_size_bytes(file: Path, values: dict[str, Value]) -> int:
    """This file's size, or every part's for a model split by gguf-split."""
    size = file.stat().st_size
    count = _positive_int(values.get("split.count"))
    match = _SPLIT_NAME.match(file.name)
    if count is None or count < 2 or match is None:
        return size
    total = 0
    for part in range(1, count + 1):
        sibling = file.with_name(f"{match['stem']}-{part:05d}-of-{count:05d}.gguf")
        total += sibling.stat().st_size if sibling.is_file() else 0
    return max(total, size)


def context_cells(facts: GGUFFacts, ctx_size: int | None, parallel: int = 1) -> int | None:
    """How many tokens llama-server's KV cache holds, as this llama.cpp sizes it.

    With an explicit --parallel N (the agent always passes one), each of the N sequences
    gets ctx_size / N tokens rounded up to a multiple of 256; with no ctx_size each gets
    the model's whole trained context, so the cache is N * context_length.
    """
    per_sequence = math.ceil(ctx_size / parallel) if ctx_size else facts.context_length
    if per_sequence is None:
        return None
    return math.ceil(per_sequence / CTX_PAD) * CTX_PAD * parallel


def kv_cache_bytes(facts: GGUFFacts, ctx_size: int | None, parallel: int = 1) -> int | None:
    """The f16 K and V caches: cells * layers * KV width * 2 bytes, for K and for V.

    KV width is n_head_kv * head size, where head size is key_length / value_length if
    the model gives them and n_embd / n_head otherwise. None when a figure is unknown.
    """
    cells = context_cells(facts, ctx_size, parallel)
    n_head, n_head_kv, n_embd = facts.n_head, facts.n_head_kv, facts.n_embd
    if cells is None or facts.n_layer is None or n_head is None or n_head_kv is None:
        return None
    head = n_embd // n_head if n_embd is not None else None
    key_length, value_length = facts.key_length or head, facts.value_length or head
    if key_length is None or value_length is None:
        return None
    return cells * facts.n_layer * n_head_kv * (key_length + value_length) * 2


def compute_bytes(facts: GGUFFacts, parallel: int = 1) -> int:
    """The compute and output buffers, as llama.cpp sizes them with flash attention.

    8 MiB + n_ubatch (512) * 4 bytes * max(n_vocab, 4 * n_ff) for the largest activation
    of a micro-batch (the logits, or the feed-forward block), plus n_vocab * 4 bytes of
    logits per parallel sequence. Unknown figures count as zero. Measured against this
    llama.cpp on CPU: 2.3 / 21.5 / 26.6 MiB actual for 64 / 768 / 1024 wide models,
    against 9.6 / 24.0 / 29.5 MiB here.
    """
    n_vocab, n_ff = facts.n_vocab or 0, facts.n_ff or 0
    return COMPUTE_BASE_BYTES + N_UBATCH * 4 * max(n_vocab, 4 * n_ff) + n_vocab * 4 * parallel


def estimate_memory_mb(facts: GGUFFacts, ctx_size: int | None, parallel: int = 1) -> int:
    """Memory llama-server needs for this model: weights + KV cache + compute, in MiB.

        weights  = the file's size (mmap'd or copied to the device as is)
        kv cache = context_cells * n_layer * n_head_kv * (key_length + value_length) * 2 B
                   (f16; see context_cells and kv_cache_bytes), 0 if figures are unknown
        compute  = see compute_bytes

    rounded up to a whole MiB. ctx_size None means llama-server's default, the model's
    trained context_length per parallel sequence.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, not {parallel}")
    total = (facts.file_size_bytes + (kv_cache_bytes(facts, ctx_size, parallel) or 0)
             + compute_bytes(facts, parallel))
    return -(-total // MIB)

