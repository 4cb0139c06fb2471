"""A GGUF's tensor table: each tensor's name, shape, type and size, never its data.

The table follows the key/value section of the header: per tensor a name, its dimensions
(ggml order: the row length first), a ggml type and an offset into the data section. The
bytes a tensor takes are ggml's row size: elements / block size * bytes per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_MAX_TENSORS = 1_000_000
_MAX_DIMS = 8
# ggml pads every tensor's data to this alignment in the file and in backend buffers.
TENSOR_ALIGNMENT = 32

# What a KV cache type name on llama-server's command line is stored as.
CACHE_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1,
    "iq4_nl": GGMLQuantizationType.IQ4_NL, "q5_0": GGMLQuantizationType.Q5_0,
    "q5_1": GGMLQuantizationType.Q5_1,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    ggml_type: int

    @property
    def n_elements(self) -> int:
        count = 1
        for d in self.dims:
            count *= d
        return count

    @property
    def nbytes(self) -> int:
        return row_bytes(self.ggml_type, self.n_elements)

    @property
    def padded_nbytes(self) -> int:
        return -(-self.nbytes // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT


def row_bytes(ggml_type: int, n_elements: int) -> int:
    """Bytes for n_elements of a ggml type (blocks of a quantized type are whole)."""
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"unknown ggml type {ggml_type}") from exc
    return -(-n_elements // block) * size


def cache_type_bytes(cache_type: str, n_elements: int) -> int:
    """Bytes a KV cache of this llama-server --cache-type-k/-v name takes for n_elements."""
    try:
        ggml_type = CACHE_TYPES[cache_type]
    except KeyError as exc:
        raise ValueError(f"unknown KV cache type {cache_type!r}; one of "
                         f"{', '.join(CACHE_TYPES)}") from exc
    return row_bytes(ggml_type, n_elements)


class _Reader(Protocol):
    def u32(self) -> int: ...
    def u64(self) -> int: ...
    def string(self) -> str: ...
    def fail(self, problem: str) -> Exception: ...


def parse_tensor_infos(header: _Reader, count: int) -> tuple[TensorInfo, ...]:
    """The tensor table, read from where the key/value section ended."""
    if count > _MAX_TENSORS:
        raise header.fail(f"the header claims {count} tensors: corrupt")
    infos = []
    for _ in range(count):
        name = header.string()
        n_dims = header.u32()
        if n_dims > _MAX_DIMS:
            raise header.fail(f"tensor {name!r} claims {n_dims} dimensions: corrupt")
        dims = tuple(header.u64() for _ in range(n_dims))
        ggml_type = header.u32()
        header.u64()  # offset into the data section: not needed
        try:
            GGMLQuantizationType(ggml_type)
        except ValueError:
            raise header.fail(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
        infos.append(TensorInfo(name, dims, ggml_type))
    return tuple(infos)
