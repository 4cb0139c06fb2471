"""Backends other than cuda and cpu: real where a real source of figures exists, else a clear no."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable

from node_agent.backends import BackendUnavailable, DeviceFigures

_MB = 1024 * 1024
Runner = Callable[[list[str]], str]


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout


def parse_rocm_smi(text: str) -> list[DeviceFigures]:
    """`rocm-smi --showmeminfo vram --showproductname --json` → devices."""
    data = json.loads(text)
    out = []
    for key in sorted(k for k in data if k.startswith("card")):
        card = data[key]
        index = int(key.removeprefix("card"))
        total = int(card.get("VRAM Total Memory (B)", 0))
        used = int(card.get("VRAM Total Used Memory (B)", 0))
        name = card.get("Card series") or card.get("Card SKU") or f"AMD GPU {index}"
        out.append(DeviceFigures(f"gpu:{index}", str(name), total // _MB, used // _MB,
                                 (total - used) // _MB,
                                 pin_env=(("HIP_VISIBLE_DEVICES", str(index)),)))
    return out


class RocmBackend:
    name = "rocm"

    def __init__(self, run: Runner = _run) -> None:
        if run is _run and shutil.which("rocm-smi") is None:
            raise BackendUnavailable("rocm backend: rocm-smi was not found on PATH; install "
                                     "ROCm's rocm-smi or use backend: cpu")
        self._run = run
        if not self.devices():
            raise BackendUnavailable("rocm backend: rocm-smi lists no GPU")

    def devices(self) -> list[DeviceFigures]:
        try:
            text = self._run(["rocm-smi", "--showmeminfo", "vram", "--showproductname", "--json"])
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendUnavailable(f"rocm backend: rocm-smi failed: {exc}") from exc
        return parse_rocm_smi(text)

    def close(self) -> None:
        return None


class MetalBackend:
    """Apple silicon: one unified-memory GPU; its memory is the machine's (sysctl hw.memsize)."""

    name = "metal"

    def __init__(self, run: Runner = _run, platform: str = sys.platform) -> None:
        if platform != "darwin":
            raise BackendUnavailable(f"metal backend: needs macOS; this host is {platform}")
        self._run = run
        self.devices()

    def devices(self) -> list[DeviceFigures]:
        try:
            total = int(self._run(["sysctl", "-n", "hw.memsize"]).strip())
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise BackendUnavailable(f"metal backend: sysctl hw.memsize failed: {exc}") from exc
        # macOS exposes no per-process GPU memory figure without private APIs: used/free
        # are unknown (None), not guessed.
        return [DeviceFigures("gpu:0", "Apple GPU (unified memory)", total // _MB, None, None)]

    def close(self) -> None:
        return None


def unsupported(name: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"{name} backend: not supported yet: RoleMesh has no real source of device memory "
        f"figures for {name} and will not make them up; use backend: cpu, cuda, rocm or metal")
