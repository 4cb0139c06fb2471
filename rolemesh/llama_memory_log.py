"""What llama-server says it allocated, read from its own log (run it with `-lv 4`).

The lines, as this llama.cpp prints them while loading:

    load_tensors:   CPU_Mapped model buffer size =     5.64 MiB
    llama_context:        CPU  output buffer size =     0.00 MiB
    llama_kv_cache:        CPU KV buffer size =     1.00 MiB
    llama_kv_cache: size =    1.00 MiB (   512 cells,   4 layers,  2/2 seqs), K (f16): ...
    sched_reserve:        CPU compute buffer size =     7.14 MiB
    load_hparams: model size:         3.48 MiB                       (an mmproj's weights)
    reserve_compute_meta:        CPU compute buffer size =     1.58 MiB     (its image)

Each figure is kept per buffer name (CPU, CPU_Mapped, CUDA0, CUDA_Host...), summed when a
name appears twice, so the estimate can be compared component by component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_MODEL = re.compile(r"load_tensors:\s+(\S+) model buffer size\s*=\s*([\d.]+) MiB")
_OUTPUT = re.compile(r"llama_context:\s+(\S+)\s+output buffer size\s*=\s*([\d.]+) MiB")
_KV = re.compile(r"llama_kv_cache:\s+(\S+) KV buffer size\s*=\s*([\d.]+) MiB")
_COMPUTE = re.compile(r"sched_reserve:\s+(\S+) compute buffer size\s*=\s*([\d.]+) MiB")
_PROJECTOR_MODEL = re.compile(r"load_hparams: model size:\s*([\d.]+) MiB")
_PROJECTOR_COMPUTE = re.compile(
    r"reserve_compute_meta:\s+(\S+) compute buffer size\s*=\s*([\d.]+) MiB")
_KV_CELLS = re.compile(r"llama_kv_cache: size\s*=\s*[\d.]+ MiB \(\s*(\d+) cells")


@dataclass
class LlamaMemoryFigures:
    """MiB per buffer name for each kind of allocation llama.cpp reports."""

    model_mib: dict[str, float] = field(default_factory=dict)
    kv_mib: dict[str, float] = field(default_factory=dict)
    compute_mib: dict[str, float] = field(default_factory=dict)
    output_mib: dict[str, float] = field(default_factory=dict)
    kv_cells: int | None = None
    projector_model_mib: float | None = None  # the mmproj's weights (clip's load_hparams)
    projector_compute_mib: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.model_mib and self.kv_mib and self.compute_mib)


def _add(into: dict[str, float], name: str, value: str) -> None:
    into[name] = into.get(name, 0.0) + float(value)


def parse_memory_log(text: str) -> LlamaMemoryFigures:
    """The buffer sizes in a llama-server log; kinds it did not print stay empty."""
    figures = LlamaMemoryFigures()
    for pattern, into in ((_MODEL, figures.model_mib), (_OUTPUT, figures.output_mib),
                          (_KV, figures.kv_mib), (_COMPUTE, figures.compute_mib)):
        for match in pattern.finditer(text):
            _add(into, match[1], match[2])
    for match in _PROJECTOR_COMPUTE.finditer(text):
        _add(figures.projector_compute_mib, match[1], match[2])
    projector = _PROJECTOR_MODEL.search(text)
    figures.projector_model_mib = float(projector[1]) if projector else None
    cells = _KV_CELLS.search(text)
    figures.kv_cells = int(cells[1]) if cells else None
    return figures
