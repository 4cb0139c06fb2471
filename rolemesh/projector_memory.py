"""A vision projector's (mmproj) memory: its weights and the compute buffer of one image.

llama.cpp's mtmd loads the projector whole (no mmap) on the model's first GPU, and
reserves a compute buffer for its worst-case image when it warms up. The weights are the
tensor table's sizes (exact); the compute buffer is fitted to what this llama.cpp reserved
on CPU for seven LLaVA-style encoders of 2-6 blocks, 256-768 wide, 197-1025 image tokens:
tokens * (11 * width + 5 * feed-forward width) bytes, within 26 % of each (ggml's
allocator reuses memory unevenly, so no simple formula does better; a one-block encoder
is overestimated up to 3x). Tokens are the image's patches plus the class token;
projectors with dynamic resolution (clip.vision.image_max_pixels) are sized at their
largest image; merges and resamplers are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rolemesh.memory_estimate import NotAGGUFFile, Value, read_gguf_header


@dataclass(frozen=True)
class ProjectorFacts:
    weights_bytes: int
    image_tokens: int
    n_embd: int
    n_ff: int
    projection_dim: int
    n_layer: int


def _int(values: dict[str, Value], key: str, default: int = 0) -> int:
    value = values.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def read_projector_facts(path: str | Path) -> ProjectorFacts:
    """The figures of an mmproj file that size its memory (reads only the header)."""
    values, _, tensors = read_gguf_header(path)
    if values.get("general.architecture") != "clip":
        raise NotAGGUFFile(f"{path}: not a projector (general.architecture is not 'clip')")
    patch = _int(values, "clip.vision.patch_size", 14) or 14
    max_pixels = _int(values, "clip.vision.image_max_pixels")
    side = _int(values, "clip.vision.image_size", 224)
    patches = max_pixels // (patch * patch) if max_pixels else (side // patch) ** 2
    return ProjectorFacts(
        weights_bytes=sum(t.padded_nbytes for t in tensors),
        image_tokens=patches + 1,
        n_embd=_int(values, "clip.vision.embedding_length"),
        n_ff=_int(values, "clip.vision.feed_forward_length"),
        projection_dim=_int(values, "clip.vision.projection_dim"),
        n_layer=_int(values, "clip.vision.block_count"))


def projector_compute_bytes(facts: ProjectorFacts) -> int:
    return facts.image_tokens * (11 * facts.n_embd + 5 * facts.n_ff)


def projector_bytes(path: str | Path) -> int:
    """Weights plus compute buffer of the projector at `path`."""
    facts = read_projector_facts(path)
    return facts.weights_bytes + projector_compute_bytes(facts)
