"""What each model really took after a load, kept per model and config fingerprint.

Once measured, the figure replaces the estimate for that model *as configured*: the
fingerprint covers every field that changes its memory (the file's size and mtime, ctx,
parallel, cache types, placement flags...), so a changed config or a replaced file is
estimated again until it is measured again. Kept in state_dir/footprints.json, written
atomically (a temp file, then rename), so a restart keeps what was learnt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import structlog

from node_agent.config import ModelConfig

log = structlog.get_logger("node_agent.footprints")
FILE_NAME = "footprints.json"
# The fields that change what a load takes; the rest (roles, alias, threads) do not.
_MEMORY_FIELDS = ("path", "ctx_size", "batch_size", "ubatch_size", "gpu_layers", "main_gpu",
                  "tensor_split", "flash_attn", "parallel", "embeddings", "server_args",
                  "cache_type_k", "cache_type_v", "mmproj", "n_cpu_moe", "cpu_moe",
                  "override_tensor")


def fingerprint(model: ModelConfig, devices: tuple[str, ...] = ()) -> str:
    """A stable hash of what decides this model's footprint (and the device group's size)."""
    data = model.model_dump(mode="json", include=set(_MEMORY_FIELDS))
    for key in ("path", "mmproj"):
        if data.get(key):
            try:
                stat = Path(data[key]).stat()
                data[key + "_file"] = [stat.st_size, stat.st_mtime_ns]
            except OSError:
                data[key + "_file"] = None
    data["devices"] = len(devices) or 1
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class Footprints:
    """The measured figures of this node, by model id and fingerprint."""

    def __init__(self, state_dir: Path) -> None:
        self._path = Path(state_dir) / FILE_NAME
        self._data: dict[str, dict[str, int]] = self._read()

    def _read(self) -> dict[str, dict[str, int]]:
        try:
            raw = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # A torn or foreign file costs only the measurements: estimate again.
            log.warning("footprints.unreadable", path=str(self._path), error=str(exc))
            return {}
        if not isinstance(raw, dict):
            return {}
        return {key: {k: int(v) for k, v in value.items() if isinstance(v, int)}
                for key, value in raw.items() if isinstance(value, dict)}

    def _key(self, model: ModelConfig, devices: tuple[str, ...]) -> str:
        return f"{model.model_id}@{fingerprint(model, devices)}"

    def lookup(self, model: ModelConfig, devices: tuple[str, ...] = ()) -> int | None:
        """The total MB measured for this model as configured, or None (not yet measured)."""
        entry = self._data.get(self._key(model, devices))
        return None if entry is None else entry.get("total_mb")

    def lookup_per_device(self, model: ModelConfig,
                          devices: tuple[str, ...] = ()) -> dict[str, int] | None:
        entry = self._data.get(self._key(model, devices))
        if entry is None:
            return None
        return {k.removeprefix("device:"): v for k, v in entry.items()
                if k.startswith("device:")} or None

    def record(self, model: ModelConfig, mb: int, devices: tuple[str, ...] = (),
               per_device_mb: dict[str, int] | None = None) -> None:
        """Keep a measured figure (total MB, and per device when known); written at once."""
        if mb < 0:
            raise ValueError(f"a measured footprint cannot be negative ({mb} MB)")
        entry = {"total_mb": int(mb)}
        for device, value in (per_device_mb or {}).items():
            entry[f"device:{device}"] = int(value)
        self._data[self._key(model, devices)] = entry
        self._write()

    def _write(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".footprints-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(self._data, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
