"""`rolemesh check-fit FILE.gguf`: a model's memory need per device and in host RAM.

    rolemesh check-fit model.gguf --ctx-size 32768 --n-cpu-moe 62 --cache-type-k q8_0 \\
        --device-mb 24576 --host-mb 40960 [--allow-disk-paging]

With --device-mb (one size per GPU of the group, or `cpu`) the answer is judged offline
against those sizes; otherwise against every device the dispatcher knows (--offline: just
the breakdown). Exit status 0 when it fits somewhere it was judged, 1 on an error, 3 when
it fits nowhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rolemesh.memory_estimate import NotAGGUFFile, read_gguf_facts
from rolemesh.placement_memory import (
    HostFit,
    MemoryBreakdown,
    MemoryPart,
    Placement,
    estimate_need,
    host_fit,
    projector_size,
)

EXIT_DOES_NOT_FIT = 3
COMPONENTS = ("weights", "kv cache", "compute", "projector", "total")


class CheckFitError(Exception):
    pass


@dataclass(frozen=True)
class Verdict:
    fits: bool
    lines: list[str]


def add_parser(subparsers: Any) -> None:
    f = subparsers.add_parser("check-fit", help="a GGUF's memory need and where it fits",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    f.add_argument("gguf", type=Path)
    f.add_argument("--ctx-size", type=int, default=None)
    f.add_argument("--parallel", type=int, default=1)
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--ubatch-size", type=int, default=None)
    f.add_argument("--cache-type-k", default="f16")
    f.add_argument("--cache-type-v", default="f16")
    f.add_argument("--flash-attn", choices=["on", "off"], default=None)
    f.add_argument("--gpu-layers", type=int, default=None)
    f.add_argument("--n-cpu-moe", type=int, default=None)
    f.add_argument("--cpu-moe", action="store_true")
    f.add_argument("--override-tensor", action="append", default=[], metavar="REGEX=BUFFER")
    f.add_argument("--tensor-split", default=None, help="shares per GPU, e.g. 3,1")
    f.add_argument("--mmproj", type=Path, default=None)
    f.add_argument("--device-mb", default=None,
                   help="judge offline against these device sizes: 24576[,24576] or cpu")
    f.add_argument("--host-mb", type=int, default=None,
                   help="host RAM available (MB) for the offline judgement")
    f.add_argument("--allow-disk-paging", action="store_true")
    f.add_argument("--margin", type=float, default=0.9)
    f.add_argument("--offline", action="store_true", help="do not ask the dispatcher")


def placement_from_args(args: argparse.Namespace) -> Placement:
    split = [float(s) for s in args.tensor_split.split(",")] if args.tensor_split else None
    flash = None if args.flash_attn is None else args.flash_attn == "on"
    return Placement(ctx_size=args.ctx_size, parallel=args.parallel,
                     batch_size=args.batch_size, ubatch_size=args.ubatch_size,
                     gpu_layers=args.gpu_layers, tensor_split=split, flash_attn=flash,
                     cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                     n_cpu_moe=args.n_cpu_moe, cpu_moe=args.cpu_moe,
                     override_tensor=list(args.override_tensor), mmproj=args.mmproj)


def _mb(value: int | None) -> str:
    return "?" if value is None else f"{value / 1024:.1f}G" if value >= 1024 else f"{value}M"


def _row(name: str, part: MemoryPart) -> list[str]:
    return [name, _mb(part.weights_mb), _mb(part.kv_cache_mb), _mb(part.compute_buffer_mb),
            _mb(part.projector_mb), _mb(part.total_mb)]


def breakdown_table(breakdown: MemoryBreakdown,
                    table: Callable[[list[list[str]], list[str]], str]) -> str:
    rows = [_row(device, part) for device, part in breakdown.per_device.items()]
    if breakdown.host.total_mb:
        rows.append(_row("host RAM", breakdown.host))
    return table(rows, ["WHERE", *(c.upper() for c in COMPONENTS)])


def judge(breakdown: MemoryBreakdown, device_mb: dict[str, int | None],
          host_available_mb: int | None, margin: float, allow_disk_paging: bool) -> Verdict:
    """Each device's part against total x margin, and the host part against what is free."""
    lines, fits = [], True
    for device, need in breakdown.per_device_mb.items():
        total = device_mb.get(device)
        if total is None:
            lines.append(f"{device}: needs {_mb(need)}, size unknown")
            continue
        budget = int(total * margin)
        ok = need <= budget
        fits &= ok
        lines.append(f"{device}: needs {_mb(need)} of {_mb(budget)} ({_mb(total)} x {margin:g})"
                     f" {'fits' if ok else 'DOES NOT FIT'}")
    unpageable = breakdown.host_mb - breakdown.host_pageable_mb
    verdict: HostFit = host_fit(breakdown.host_mb, host_available_mb, allow_disk_paging,
                                unpageable_mb=unpageable)
    if breakdown.host_mb or host_available_mb is not None:
        lines.append(verdict.note + ("" if verdict.ok else " DOES NOT FIT"))
    return Verdict(fits and verdict.ok, lines)


def _group(device_mb: str) -> dict[str, int | None]:
    if device_mb.strip() == "cpu":
        return {"cpu": None}
    return {f"gpu:{i}": int(v) for i, v in enumerate(device_mb.split(","))}


def check_fit(args: argparse.Namespace, nodes: dict[str, Any] | None,
              table: Callable[[list[list[str]], list[str]], str]) -> tuple[str, bool]:
    """The report and whether the model fits somewhere it was judged."""
    try:
        facts = read_gguf_facts(args.gguf)
        placement = placement_from_args(args)
        projector = projector_size(placement)
    except (NotAGGUFFile, OSError, ValueError) as exc:
        raise CheckFitError(str(exc)) from exc
    head = (f"{args.gguf.name}: {facts.architecture}, {facts.n_layer} layers"
            + (f", {facts.n_expert} experts ({facts.n_expert_used} active)"
               if facts.n_expert else "")
            + f", {len(facts.tensors)} tensors, ctx_size {args.ctx_size or facts.context_length}"
            + f" x {args.parallel}, KV {args.cache_type_k}/{args.cache_type_v}")
    groups: list[tuple[str, dict[str, int | None], int | None]] = []
    if args.device_mb:
        groups.append(("", _group(args.device_mb), args.host_mb))
    elif nodes is not None:
        for n in nodes.get("data", []):
            host = n.get("host_memory_available_mb")
            for d in n.get("devices", []):
                status = d.get("status", d)
                groups.append((f"{n['node_id']} ", {status["device_id"]:
                                                    status.get("memory_total_mb")}, host))
    if not groups:
        try:
            breakdown = estimate_need(placement, facts, ["gpu:0"], projector_bytes=projector)
        except ValueError as exc:
            raise CheckFitError(str(exc)) from exc
        return "\n".join([head, "", breakdown_table(breakdown, table)]), True
    out, anywhere = [head], False
    for label, device_mb, host in groups:
        try:
            breakdown = estimate_need(placement, facts, list(device_mb),
                                      projector_bytes=projector)
        except ValueError as exc:
            raise CheckFitError(str(exc)) from exc
        verdict = judge(breakdown, device_mb, host, args.margin, args.allow_disk_paging)
        anywhere |= verdict.fits
        out += ["", f"{label}{', '.join(device_mb)}: {'fits' if verdict.fits else 'no'}",
                breakdown_table(breakdown, table), *("  " + line for line in verdict.lines)]
    return "\n".join(out), anywhere
